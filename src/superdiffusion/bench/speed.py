"""Speed and memory of every method's training step and of inference, as `superdiffusion bench-speed` prints them.

Why this shape: the issue asks for a comparison with the reference implementation, whose co-training step
with R = 3 at 128x128, batch 8 labelled + 8 unlabelled, takes 37.6-39.4 s and 6.5 GiB on the 2-core machine
(pre-training step 6.4-6.7 s); the default 2D configuration must do it in a tenth of the time and a quarter of
the memory. So the 2D rows always use that protocol (128x128, 8+8) whatever the config's own patch, and every
number is also given as a ratio to the supervised step measured in the same run (robust to machine load).

Timing: median over `repeats` after `warmup` runs (the first run pays one-off allocation and kernel set-up).
Memory (CPU): each training row runs in a fresh process forked from a forkserver that has only imported
torch, so "peak MiB" is that process's peak resident set (VmHWM, torch's own ~0.3 GiB included: the
conservative figure used against the target) and "growth MiB" what the method, its optimisers and the step
added. Inference rows share one process per dimensionality, the peak reset between rows through
/proc/self/clear_refs. On CUDA both are torch.cuda.max_memory_allocated. With isolate=False (tests) every row
runs in-process and memory is the same /proc reset estimate.

Switches (opt-in, never defaults; each measured against the plain run in the same invocation): compile
(torch.compile of every U-Net, in place), channels_last (channels-last memory format), bf16 (CPU autocast to
bfloat16), amp (CUDA autocast to bfloat16), hold_memory (CPU: glibc keeps freed memory for the next step,
engine.host; measured in its own fresh process, as it changes that process's allocator for good).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import load_config
from ..errors import InputError

DEFAULT_CONFIGS = {2: "la2d-superdiffusion", 3: "la3d-superdiffusion"}
# The reference implementation on the 2-core machine, and the targets (a tenth / a quarter of it).
REFERENCE = {"step_s": (37.6, 39.4), "step_gib": 6.5, "pretrain_s": (6.4, 6.7)}
TARGET_S, TARGET_GIB = 3.8, 1.6
LA_VOLUME = (190, 140, 88)  # a typical left-atrium MRI (mri_norm2.h5 sizes are ~180-212 x 135-146 x 88)
PROFILES: dict[str, dict] = {
    # quick: ~3 minutes on 2 idle cores; 3D small (one 64x64x48 2+2 co-training step alone takes ~100 s there);
    # a row stops repeating once its timed runs would pass budget_s (at least one timed run)
    "quick": {"warmup": 1, "repeats": 2, "budget_s": 30.0, "train2d": [128, 128], "batch2d": [8, 8],
              "train3d": [32, 32, 32], "batch3d": [2, 2], "window2d": None, "window3d": [32, 32, 32],
              "volume2d": LA_VOLUME, "volume3d": [95, 70, 44]},
    # full: the configs' own 3D patch and whole LA volumes (meant for a GPU or a long wait)
    "full": {"warmup": 2, "repeats": 5, "budget_s": None, "train2d": [128, 128], "batch2d": [8, 8], "train3d": None,
             "batch3d": [2, 2], "window2d": None, "window3d": None, "volume2d": LA_VOLUME, "volume3d": LA_VOLUME},
}
# (row name, method, overrides): the co-training step is CoTrain's (SuperDiffusion = pre-training + it)
TRAIN_ROWS = [("supervised", "supervised", []), ("pretrain", "pretrain", []), ("cps", "cps", []),
              ("unimatch", "unimatch", []), ("fixmatch", "fixmatch", []),
              ("superdiffusion R=0", "cotrain", ["superdiffusion.rounds=0"]),
              ("superdiffusion R=3", "cotrain", ["superdiffusion.rounds=3"]),
              ("superdiffusion R=5", "cotrain", ["superdiffusion.rounds=5"])]
REFERENCE_ROWS = ("supervised", "pretrain", "superdiffusion R=3")
EFFECT_ROWS = ("supervised", "superdiffusion R=3", "student volume")
SWITCHES = ("compile", "channels_last", "bf16", "amp", "hold_memory")


# ---- memory ------------------------------------------------------------------------------------
def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory of a phase: CUDA allocator peak, else resident-set high-water mark (reset if Linux allows)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.base = _status_mib("VmRSS") or 0.0

    def stop(self) -> tuple[float, float]:
        """(peak MiB, growth MiB over the start)."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = _status_mib("VmHWM")
            if peak is None:  # not Linux: ru_maxrss (KiB), never reset
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return round(peak, 1), round(max(peak - self.base, 0.0), 1)


# ---- one measurement -----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device,
           budget_s: float | None = None) -> dict:
    """Median of `repeats` timed calls after `warmup`; past `budget_s` of timed calls, stop early (at least one)."""
    times = []
    while len(times) < warmup + repeats:
        runs = times[warmup:]
        if runs and budget_s is not None and sum(runs) + runs[-1] > budget_s:
            break
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    runs = times[warmup:]
    return {"seconds": statistics.median(runs), "runs": [round(t, 4) for t in runs],
            "warmup_runs": [round(t, 4) for t in times[:warmup]]}


def _config(spec: dict, method: str, extra: Sequence[str] = ()) -> dict:
    shape, (bl, bu) = spec["shape"], spec["batch"]
    return load_config(spec["config"], [f"method={method}", f"train.patch={list(shape)}", f"train.batch_size={bl}",
                                        f"train.unlabelled_batch_size={bu}", "superdiffusion.pretrained=false",
                                        "superdiffusion.init=null", *spec["overrides"], *extra])


def _prepare(method: torch.nn.Module, variant: dict, dims: int) -> None:
    """Apply the opt-in switches to every U-Net of a method (in place, so isinstance checks still hold)."""
    from ..nets.unet import NETS

    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    for net in [m for m in method.modules() if isinstance(m, NETS)]:
        if variant.get("channels_last"):
            net.to(memory_format=fmt)
        if variant.get("compile"):
            net.compile()


def _autocast(variant: dict, device: torch.device):
    if variant.get("bf16") and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if variant.get("amp") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _images(n: int, shape: Sequence[int], variant: dict, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand((n, 1, *shape), generator=g) * 2 - 1).to(device)
    if variant.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 2 else torch.channels_last_3d)
    return x


def train_row(spec: dict) -> dict:
    """Median time and peak memory of one method's training step + backward + optimiser steps."""
    from ..engine.trainer import build_optimizer
    from ..methods import build_method

    device, variant, shape, (bl, bu) = torch.device(spec["device"]), spec["variant"], spec["shape"], spec["batch"]
    cfg = _config(spec, spec["method"], spec["row_overrides"])
    probe = MemoryProbe(device)
    probe.start()
    torch.manual_seed(0)
    method = build_method(cfg, in_channels=1).to(device).train()
    _prepare(method, variant, len(shape))
    optimizers = [build_optimizer(p, cfg["train"]) for p in method.optimizer_groups().values()]
    batch = {"image": _images(bl, shape, variant, device, 1),
             "label": torch.randint(0, cfg["data"]["num_classes"], (bl, *shape),
                                    generator=torch.Generator().manual_seed(2)).to(device),
             "unlabelled": _images(bu * method.unlabelled_draws, shape, variant, device, 3)}  # UniMatch: 2 draws
    generator, step = torch.Generator().manual_seed(0), [0]

    method.early_backward = True  # as the single-process trainer runs it

    def one_step() -> None:  # the order of engine.trainer.Trainer.fit
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        with _autocast(variant, device):
            loss, _ = method.training_step(batch, step=step[0], total_steps=1000, generator=generator)
        if loss.requires_grad:  # SuperDiffusion back-propagates its parts early
            loss.backward()
        for o in optimizers:
            o.step()
        method.after_step(step[0])
        step[0] += 1

    out = _timed(one_step, warmup=spec["warmup"], repeats=spec["repeats"], device=device, budget_s=spec.get("budget_s"))
    images = bl if spec["method"] in ("supervised", "pretrain") else bl + bu
    peak, growth = probe.stop()
    return {**out, "unit": "s/step", "rate": images / out["seconds"], "rate_unit": "img/s", "images": images,
            "peak_mib": peak, "growth_mib": growth}


def infer_rows(spec: dict) -> list[dict]:
    """Teacher (one fixed pass, k-step DDIM, ensemble of n) per image, student per whole LA-size volume."""
    from ..data.case import Case
    from ..evaluation.inference import predict_probabilities
    from ..methods import build_method

    device, variant, window = torch.device(spec["device"]), spec["variant"], spec["window"]
    cfg = _config(spec, "cotrain", [f"train.patch={list(window)}"])
    dc, ec = cfg["diffusion"], cfg["eval"]
    probe = MemoryProbe(device)
    torch.manual_seed(0)
    method = build_method(cfg, in_channels=1).to(device).eval()
    _prepare(method, variant, len(window))
    teacher, n = method.teacher, int(ec["sw_batch_size"])
    x = _images(n, window, variant, device, 4)
    size = "x".join(map(str, window))
    jobs: list[tuple[str, Callable[[], object], int, str]] = []
    if not spec.get("student_only"):
        jobs += [("teacher one pass", lambda: teacher.predict_fixed(x, t=dc["t_infer"], noise_seed=0), n, "image"),
                 (f"teacher DDIM k={dc['ddim_steps']}",
                  lambda: teacher.predict_ddim(x, steps=dc["ddim_steps"], noise_seed=0), n, "image"),
                 (f"teacher ensemble n={dc['ensemble']}",
                  lambda: teacher.predict_ensemble(x, samples=dc["ensemble"], t=dc["t_infer"], noise_seed=0), n,
                  "image")]
    volume = np.random.default_rng(5).standard_normal((1, *spec["volume"])).astype(np.float32)
    case = Case("bench", volume, None, (1.0,) * len(spec["volume"]), "bench", {})
    student = method.predictors()["student"]

    def whole_volume() -> None:
        predict_probabilities(student, case, data_cfg=cfg["data"], dims=cfg["data"]["dims"], patch=list(window),
                              overlap=ec["overlap"], sw_batch_size=ec["sw_batch_size"], device=device)

    slices = spec["volume"][cfg["data"]["slice_axis"]] if cfg["data"]["dims"] == 2 else spec["volume"][-1]
    jobs.append(("student volume", whole_volume, 1, "volume"))
    rows = []
    for name, fn, per, unit in jobs:
        probe.start()
        with torch.no_grad(), _autocast(variant, device):
            out = _timed(fn, warmup=spec["warmup"], repeats=spec["repeats"], device=device,
                         budget_s=spec.get("budget_s"))
        peak, growth = probe.stop()
        out["seconds"] /= per
        out["runs"] = [round(t / per, 4) for t in out["runs"]]
        row = {**out, "row": name, "unit": f"s/{unit}", "peak_mib": peak, "growth_mib": growth}
        if unit == "volume":
            row.update(rate=slices / out["seconds"], rate_unit="slices/s",
                       size=f"volume {'x'.join(map(str, spec['volume']))}, window {size}, {slices} slices")
        else:
            row.update(rate=1 / out["seconds"], rate_unit="img/s", size=f"{size}, batch {n}")
        rows.append(row)
    return rows


def plain_unet_rows(spec: dict) -> list[dict]:
    """Supervised training (2D: 96x96, batch 16; 3D: the training rows' patch and labelled batch): this package's
    supervised step (the config's network, loss and optimiser) beside a plain MONAI UNet of the config's widths
    (strides 2, no residual units; Adam, Dice + CE), timed in the same process, so that the package's speed is judged
    against the library's on the same cores and load."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet as MonaiUNet

    from ..engine.trainer import build_optimizer
    from ..methods import build_method

    device, variant, dims = torch.device(spec["device"]), spec["variant"], spec["dims"]
    shape, batch_size = tuple(spec["shape"]), int(spec["batch_size"])
    cfg = load_config(spec["config"], [*spec["overrides"], "method=supervised", f"train.patch={list(shape)}",
                                       f"train.batch_size={batch_size}"])
    torch.manual_seed(0)
    ours = build_method(cfg, in_channels=1).to(device).train()
    _prepare(ours, variant, dims)
    channels = tuple(cfg["model"]["channels"])
    plain = MonaiUNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=channels,
                      strides=(2,) * (len(channels) - 1), num_res_units=0).to(device).train()
    if variant.get("channels_last"):
        plain.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    plain_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    image = _images(batch_size, shape, variant, device, 1)
    label = torch.randint(0, 2, (batch_size, *shape), generator=torch.Generator().manual_seed(2)).to(device)
    opt_ours = build_optimizer(ours.parameters(), cfg["train"])
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def step_ours() -> None:
        opt_ours.zero_grad(set_to_none=True)
        loss, _ = ours.training_step({"image": image, "label": label}, step=0, total_steps=1000, generator=generator)
        loss.backward()
        opt_ours.step()

    def step_plain() -> None:
        opt_plain.zero_grad(set_to_none=True)
        plain_loss(plain(image), label[:, None]).backward()
        opt_plain.step()

    rows = []
    for name, fn, net in ((f"supervised ({spec['config']})", step_ours, ours), ("plain MONAI UNet", step_plain, plain)):
        out = _timed(fn, warmup=max(spec["warmup"], 2), repeats=max(spec["repeats"], 5), device=device)
        rows.append({"row": name, "dims": dims, "size": f"{'x'.join(map(str, shape))}, batch {batch_size}",
                     "params": sum(p.numel() for p in net.parameters()), **out, "rate": batch_size / out["seconds"]})
    return rows


PLAIN_SHAPE, PLAIN_BATCH = (96, 96), 16


def _worker(task: str, spec: dict) -> dict | list[dict]:
    """Entry point of an isolated measurement; errors come back as data, so one failure never stops the table."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["variant"].get("hold_memory"):
        from ..engine.host import hold_freed_memory

        hold_freed_memory()
    if spec["variant"].get("compile"):  # compile in the measuring process itself, no pool of compile workers
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        return {"train": train_row, "infer": infer_rows, "plain": plain_unet_rows}[task](spec)
    except Exception as err:  # reported in the table (e.g. torch.compile without a compiler)
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"}


class _Runner:
    """Runs measurements in-process, or each in a fresh process forked from a torch-only forkserver."""

    def __init__(self, isolate: bool):
        self.isolate = isolate
        if isolate:
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(["torch", "superdiffusion.bench.speed", "superdiffusion.methods",
                                             "superdiffusion.engine.trainer", "superdiffusion.evaluation.inference"])

    def __call__(self, task: str, spec: dict):
        if not self.isolate:
            return _worker(task, spec)
        pool = self.ctx.Pool(1)
        try:
            return pool.apply(_worker, (task, spec))
        finally:  # a normal exit, so that the child's own helpers (inductor's compile workers) shut down cleanly
            pool.close()
            pool.join()


# ---- the whole benchmark -------------------------------------------------------------------------
def run_benchmark(*, config: str | None = None, dims: str = "both", profile: str = "quick", repeats: int | None = None,
                  warmup: int | None = None, reference_step: bool = False, switches: Sequence[str] = (),
                  overrides: Sequence[str] = (), sizes: dict | None = None, isolate: bool = True,
                  device: str | None = None, threads: int | None = None, only: Sequence[str] | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Measure every row (or `only` the named training rows, and inference if named); returns {"meta", "rows",
    "effects", "reference"} (format_report prints it)."""
    if profile not in PROFILES:
        raise InputError(f"--profile: unknown {profile!r} ({', '.join(PROFILES)})")
    if dims not in ("2", "3", "both"):
        raise InputError(f"--dims: {dims!r} must be 2, 3 or both")
    bad = [s for s in switches if s not in SWITCHES]
    if bad:
        raise InputError(f"unknown switch {bad[0]!r} ({', '.join(SWITCHES)})")
    known = [name for name, _, _ in TRAIN_ROWS] + ["inference"]
    unknown = [r for r in only or () if r not in known]
    if unknown:
        raise InputError(f"--rows: unknown row {unknown[0]!r} ({', '.join(known)})")
    p = {**PROFILES[profile], **(sizes or {})}
    p["warmup"] = p["warmup"] if warmup is None else warmup
    p["repeats"] = p["repeats"] if repeats is None else repeats
    if p["repeats"] < 1 or p["warmup"] < 0:
        raise InputError("--repeats must be >= 1 and --warmup >= 0")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "amp" in switches and dev != "cuda":
        raise InputError("--amp is CUDA autocast: it needs a GPU (on CPU, --bf16 measures bfloat16 autocast)")
    if "bf16" in switches and dev != "cpu":
        raise InputError("--bf16 is CPU autocast; on a GPU use --amp")
    if "hold_memory" in switches and not (isolate and dev == "cpu"):
        raise InputError("--hold-memory changes a process's allocator for good and is for CPUs: measure it on "
                         "--device cpu without --in-process")
    configs = dict(DEFAULT_CONFIGS)
    if config is not None:
        cfg = load_config(config, list(overrides))
        configs[cfg["data"]["dims"]] = config
    wanted = [2] if reference_step else ([2, 3] if dims == "both" else [int(dims)])
    runner = _Runner(isolate and dev == "cpu")
    log = log or (lambda s: None)
    rows: list[dict] = []
    cfgs: dict[int, dict] = {}  # each dimensionality's config, for the training and the plain-UNet rows
    effects: list[dict] = []
    for d in wanted:
        cfg = cfgs[d] = load_config(configs[d], list(overrides))
        shape = list(p[f"train{d}d"] or cfg["train"]["patch"])
        window = list(p[f"window{d}d"] or cfg["train"]["patch"])
        base = {"config": configs[d], "overrides": list(overrides), "device": dev, "threads": threads,
                "warmup": p["warmup"], "repeats": p["repeats"], "budget_s": p["budget_s"] if repeats is None else None,
                "batch": list(p[f"batch{d}d"])}
        tc = cfg["train"]  # the config's own switches (train.compile, .channels_last, .amp) apply to every row
        plain = {k: True for k, on in (("compile", tc.get("compile")), ("channels_last", tc.get("channels_last")),
                                       ("hold_memory", tc.get("hold_memory")),
                                       ("amp" if dev == "cuda" else "bf16", tc.get("amp"))) if on}
        model = (f"{configs[d]}: channels {cfg['model']['channels']}, norm {cfg['model']['norm']}"
                 + (f"; config switches {', '.join(plain)}" if plain else ""))
        for name, method, extra in TRAIN_ROWS:
            if (reference_step and name not in REFERENCE_ROWS) or (only and name not in only):
                continue
            log(f"{d}D train {name} ...")
            spec = {**base, "shape": shape, "method": method, "row_overrides": extra, "variant": plain}
            res = runner("train", spec)
            bl, bu = p[f"batch{d}d"]
            batch = f"{bl}" if method in ("supervised", "pretrain") else f"{bl}+{bu}"  # who reads unlabelled
            rows.append({"dims": d, "kind": "train", "row": name, "model": model,
                         "size": f"{'x'.join(map(str, shape))}, batch {batch}", **res})
            for s in switches if name in EFFECT_ROWS else ():
                log(f"{d}D train {name} --{s.replace('_', '-')} ...")
                effects.append({"dims": d, "row": name, "switch": s,
                                **runner("train", {**spec, "variant": {**plain, s: True}})})
        if not reference_step and (not only or "inference" in only):
            log(f"{d}D inference ...")
            spec = {**base, "shape": shape, "window": window, "volume": list(p[f"volume{d}d"]), "variant": plain}
            res = runner("infer", spec)
            for r in res if isinstance(res, list) else [{"row": "inference", **res}]:
                rows.append({"dims": d, "kind": "infer", "model": model, **r})
            for s in switches:
                log(f"{d}D inference --{s.replace('_', '-')} ...")
                res = runner("infer", {**spec, "variant": {**plain, s: True}, "student_only": True})
                for r in res if isinstance(res, list) else [{"row": "student volume", **res}]:
                    effects.append({"dims": d, "switch": s, **r})
    plain_rows = []
    for d in wanted:
        cfg_d = cfgs[d]
        # 2D at 96x96 batch 16 (the brief's yardstick); 3D at the training rows' patch and labelled batch
        shape, batch_size = (PLAIN_SHAPE, PLAIN_BATCH) if d == 2 else \
            (list(p["train3d"] or cfg_d["train"]["patch"]), p["batch3d"][0])
        log(f"{d}D supervised vs plain MONAI UNet, {'x'.join(map(str, shape))} batch {batch_size} ...")
        res = runner("plain", {"config": configs[d], "overrides": list(overrides), "device": dev, "threads": threads,
                               "warmup": p["warmup"], "repeats": p["repeats"], "dims": d, "shape": list(shape),
                               "batch_size": batch_size,
                               "variant": {"channels_last": True} if cfg_d["train"]["channels_last"] else {}})
        plain_rows += res if isinstance(res, list) else [{"row": "supervised vs plain MONAI UNet", "dims": d, **res}]
    _ratios(rows)
    meta = {"profile": profile, "device": dev, "threads": threads or torch.get_num_threads(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "warmup": p["warmup"], "repeats": p["repeats"], "budget_s": p["budget_s"] if repeats is None else None,
            "switches": list(switches), "configs": {str(d): configs[d] for d in wanted}, "overrides": list(overrides),
            "memory": "fresh process per training row: peak = its VmHWM" if runner.isolate and dev == "cpu"
            else ("torch.cuda.max_memory_allocated" if dev == "cuda" else "in-process VmHWM after a reset")}
    return {"meta": meta, "rows": rows, "effects": _effect_ratios(effects, rows), "reference": _reference(rows),
            "plain_unet": plain_rows}


def _ratios(rows: list[dict]) -> None:
    """Each row's seconds against the supervised step of the same dimensionality, measured in the same run."""
    for d in {r["dims"] for r in rows}:
        sup = next((r for r in rows if r["dims"] == d and r["row"] == "supervised" and "seconds" in r), None)
        for r in rows:
            if r["dims"] == d and sup and "seconds" in r:
                r["x_supervised"] = r["seconds"] / sup["seconds"]


def _effect_ratios(effects: list[dict], rows: list[dict]) -> list[dict]:
    for e in effects:
        base = next((r for r in rows if r["dims"] == e["dims"] and r["row"] == e.get("row") and "seconds" in r), None)
        if base and "seconds" in e:
            e["baseline_s"], e["speedup"] = base["seconds"], base["seconds"] / e["seconds"]
    return effects


def _reference(rows: list[dict]) -> dict:
    step = next((r for r in rows if r["dims"] == 2 and r["row"] == "superdiffusion R=3" and "seconds" in r), None)
    pre = next((r for r in rows if r["dims"] == 2 and r["row"] == "pretrain" and "seconds" in r), None)
    out = {}
    if step:
        gib = step["peak_mib"] / 1024
        out.update(step_s=step["seconds"], step_peak_gib=gib, step_growth_gib=step["growth_mib"] / 1024,
                   size=step["size"], time_met=step["seconds"] <= TARGET_S, memory_met=gib <= TARGET_GIB)
    if pre:
        out.update(pretrain_s=pre["seconds"], size=out.get("size", pre["size"]))
    return out


# ---- printing ------------------------------------------------------------------------------------
def format_report(result: dict) -> str:
    m = result["meta"]
    lines = [f"bench-speed: profile {m['profile']}, device {m['device']}, {m['threads']} threads, torch {m['torch']}, "
             f"median of {m['repeats']} runs after {m['warmup']} warm-up"
             + (f" (fewer past {m['budget_s']:.0f} s of timed runs in a row)" if m["budget_s"] else "")
             + f"; memory: {m['memory']}"]
    for d in sorted({r["dims"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["dims"] == d]
        lines += ["", f"{d}D model: {rows[0]['model']}",
                  f"{'row':<34} {'size':<48} {'rate':>14} {'seconds':>15} {'peak MiB':>9} {'growth MiB':>10} "
                  f"{'x supervised':>12}"]
        for r in rows:
            if "error" in r:
                lines.append(f"{r['row']:<34} error: {r['error']}")
                continue
            label = ("train " if r["kind"] == "train" else "infer ") + r["row"]
            lines.append(f"{label:<34} {r.get('size', ''):<48} {r['rate']:>8.2f} {r['rate_unit']:<8}"
                         f"{r['seconds']:>8.3f} {r['unit']:<8}{r['peak_mib']:>8.0f} {r['growth_mib']:>10.0f} "
                         f"{r.get('x_supervised', float('nan')):>12.2f}")
    if result["effects"]:
        lines += ["", "switches (same run, same sizes; speed-up = plain seconds / switched seconds):",
                  f"{'dims':<5}{'row':<26}{'switch':<15}{'plain s':>9}{'switched s':>11}{'speed-up':>9}{'peak MiB':>9}"]
        for e in result["effects"]:
            head = f"{e['dims']:<5}{e.get('row', ''):<26}{'--' + e['switch'].replace('_', '-'):<15}"
            if "error" in e or "speedup" not in e:
                lines.append(head + f"error: {e.get('error', 'no plain measurement')}")
            else:
                lines.append(head + f"{e['baseline_s']:>9.3f}{e['seconds']:>11.3f}{e['speedup']:>9.2f}"
                                    f"{e['peak_mib']:>9.0f}")
    if result.get("plain_unet"):
        lines += ["", "supervised training beside a plain MONAI UNet, same process (median of at least 5 steps):",
                  f"{'dims':<5}{'row':<44}{'size':<24}{'params':>10}{'img/s':>10}{'s/step':>9}"]
        for r in result["plain_unet"]:
            head = f"{r['dims']:<5}{r['row']:<44}"
            lines.append(head + f"error: {r['error']}" if "error" in r else
                         head + f"{r['size']:<24}{r['params']:>10}{r['rate']:>10.1f}{r['seconds']:>9.3f}")
    ref = result["reference"]
    protocol = ref.get("size") == "128x128, batch 8+8"
    if "step_s" in ref:
        lo, hi = REFERENCE["step_s"]
        verdict = (f"time {'met' if ref['time_met'] else 'NOT met'}, memory {'met' if ref['memory_met'] else 'NOT met'}"
                   if protocol else f"no verdict: measured at {ref['size']}, not the reference protocol")
        if protocol and (m["configs"].get("2") != DEFAULT_CONFIGS[2] or m["overrides"]):
            verdict += f" (for {m['configs'].get('2')} {' '.join(m['overrides'])}, not the default 2D configuration)"
        label = "128x128 8+8" if protocol else ref["size"]
        lines += ["", f"co-training step R=3 {label}: {ref['step_s']:.2f} s (target <= {TARGET_S} s; reference "
                      f"{lo}-{hi} s), peak {ref['step_peak_gib']:.2f} GiB (target <= {TARGET_GIB} GiB; reference "
                      f"{REFERENCE['step_gib']} GiB; growth {ref['step_growth_gib']:.2f} GiB): {verdict}",
                  "  (Dice is compared by evaluation runs, not here)"]
    if "pretrain_s" in ref:
        lo, hi = REFERENCE["pretrain_s"]
        lines.append(f"pre-training step {'128x128 8' if protocol else ref['size']}: {ref['pretrain_s']:.2f} s "
                     f"(reference {lo}-{hi} s)")
    return "\n".join(lines)


def run_from_args(args) -> int:
    import sys

    switches = [s for s in SWITCHES if getattr(args, s, False)]
    if args.json and Path(args.json).exists():
        raise InputError(f"{args.json}: exists already; choose another --json")
    result = run_benchmark(config=args.config, dims=args.dims, profile=args.profile, repeats=args.repeats,
                           warmup=args.warmup, reference_step=args.reference_step, switches=switches,
                           overrides=args.overrides, isolate=not args.in_process, device=args.device,
                           threads=args.threads, only=args.rows.split(",") if args.rows else None,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
