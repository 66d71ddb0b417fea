"""The one training loop every method runs on.

Budget in optimiser steps; periodic validation at the original resolution; tqdm progress with ETA;
JSON-lines and TensorBoard logs; atomic checkpoints (last and best-on-validation) holding the
networks, every optimiser and scheduler, the step and every RNG state, so `resume` continues a killed
run to the same final weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, previous_path, rng_state, save_checkpoint, set_rng_state
from ..data.perturb import PhotometricView
from ..data.pipeline import DataBundle, PatchSampler
from ..device import resolve_device
from ..errors import InputError
from ..evaluation.inference import evaluate_cases
from ..methods.base import Method
from ..nets.unet import NETS
from ..runlog import log_entries
from . import distributed
from .monitor import PseudoLabelMonitor


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf: training stops, the last good checkpoint stays."""


def build_optimizer(params, train_cfg: dict, lr: float | None = None) -> torch.optim.Optimizer:
    lr = train_cfg["lr"] if lr is None else lr
    kind, wd = train_cfg["optimizer"], train_cfg["weight_decay"]
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)  # UA-MT's, SSL4MIS's, BCP's
    raise InputError(f"train.optimizer: unknown {kind!r} (adam, adamw, sgd)")


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up, then poly(0.9), cosine or constant."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "poly":
        return (1 - progress) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "constant":
        return 1.0
    raise InputError(f"train.lr_schedule: unknown {schedule!r} (poly, cosine, constant)")


class Trainer:
    """Runs `method` for cfg.train.steps steps in `run_dir` (one stage of a pipeline per folder).

    `stage` k > 0 marks an earlier stage of a pipeline (run.run_stage): it draws its own batches, augmentations
    and random numbers, where the same (seed, step) would otherwise replay them in the final stage (BCP's
    self-training would repeat its pre-training's labelled batches and boxes step for step)."""

    def __init__(self, method: Method, cfg: dict, data: DataBundle, run_dir: str | Path, *,
                 lr: float | None = None, steps: int | None = None, validate: bool = True,
                 val_every: int | None = None, progress: bool = True, stage: int = 0):
        self.method, self.cfg, self.data = method, cfg, data
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        tc = cfg["train"]
        self.steps = int(tc["steps"] if steps is None else steps)
        self.validate = validate and bool(data.val) and getattr(method, "validates", True)
        self.val_every = int(tc["val_every"] if val_every is None else val_every)
        self.progress = progress
        self.device = resolve_device(tc["device"])
        if self.device.type == "cuda" and distributed.rank_world()[1] > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())
        method.to(self.device)  # before the optimisers are built: they hold these parameters
        self.memory_format = None
        if tc["channels_last"]:
            self.memory_format = torch.channels_last if cfg["data"]["dims"] == 2 else torch.channels_last_3d
            method.to(memory_format=self.memory_format)
        if tc["compile"]:
            for module in method.modules():
                if isinstance(module, NETS):
                    module.compile()
        self.optimizers = {k: build_optimizer(p, tc, lr) for k, p in method.optimizer_groups().items()}
        self.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: lr_factor(s, total=self.steps, warmup=tc["warmup"], schedule=tc["lr_schedule"]))
            for k, o in self.optimizers.items()}
        dims, seed = cfg["data"]["dims"], cfg["seed"]
        common = dict(dims=dims, patch=tc["patch"], slice_axis=cfg["data"]["slice_axis"],
                      augment=tc["augment"], seed=seed)
        if getattr(method, "reads_labels", True):
            self.labelled = PatchSampler(data.labelled, fg_oversample=tc["fg_oversample"], stream=2 * stage,
                                         photometric=PhotometricView() if tc["photometric"] else None, **common)
        else:  # label-free stage (pre-training): every training image, no label reachable
            self.labelled = PatchSampler([c.without_label() for c in data.labelled] + data.unlabelled,
                                         stream=2 * stage, **common)
        self.unlabelled = None
        if method.uses_unlabelled:
            if not data.unlabelled:
                raise InputError("this method needs unlabelled cases, but the split left none "
                                 "(lower split.labelled)")
            self.unlabelled = PatchSampler(data.unlabelled, stream=2 * stage + 1, **common)
        self.monitor = None  # the final stage's pseudo-labellers against the unlabelled cases' withheld labels
        if not stage and self.validate and distributed.rank_world()[0] == 0 and method.pseudo_labellers():
            self.monitor = PseudoLabelMonitor.from_config(cfg, data.split.get("unlabelled", []),
                                                          threshold=method.pseudo_label_threshold)
        self.seed = seed
        self.stage_key = (stage,) if stage else ()  # the final stage keeps the draws it always had
        self.generator = torch.Generator()  # re-seeded from (seed, step, rank, stage) before every step
        self.step, self.best = 0, -1.0
        # wall seconds of training in earlier segments of this run (a resumed run's checkpoint carries them), and
        # when this segment's training started: results.json then gives the total over every segment
        self.earlier_s, self.segment_t0 = 0.0, None
        self.rank, self.world = distributed.rank_world()
        method.early_backward = self.world == 1
        self.model = method  # what the step is called through: DDP averages the gradients across ranks
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                method, find_unused_parameters=True, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {"config": json.dumps(self.cfg), "method": self.method.name, "step": self.step,
                "best": self.best, "model": self.method.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "rng": rng_state(), "elapsed_s": self.elapsed_s(),
                "in_channels": self.data.in_channels, "num_classes": self.method.num_classes}

    def save(self, name: str) -> None:
        if self.rank == 0:
            save_checkpoint(self.state(), self.ckpt_dir / name)

    def restore(self, payload: dict) -> None:
        self.method.load_state_dict(payload["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(payload["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(payload["schedulers"][k])
        set_rng_state(payload["rng"])
        self.step, self.best = int(payload["step"]), float(payload["best"])
        self.earlier_s = float(payload.get("elapsed_s", 0.0))  # checkpoints of older versions lack it

    def elapsed_s(self) -> float:
        """Wall seconds spent training this stage so far, over every segment of the run."""
        now = 0.0 if self.segment_t0 is None else time.perf_counter() - self.segment_t0
        return self.earlier_s + now

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format) if self.memory_format and x.is_floating_point() else x

    def carry_optimizer_state(self, payload: dict) -> None:
        """Start from an earlier stage's optimiser state (momenta, Adam's moments and step) over the same
        parameters, keeping this stage's own learning rate and schedule."""
        saved = list(payload["optimizers"].values())
        current = [o.state_dict() for o in self.optimizers.values()]
        sizes = [sum(len(g["params"]) for o in opts for g in o["param_groups"]) for opts in (saved, current)]
        if len(saved) != 1 or len(current) != 1 or sizes[0] != sizes[1]:
            raise ValueError(f"carry_optimizer: {len(saved)} saved and {len(current)} current optimisers "
                             f"over {sizes} parameters; it needs one of each over the same parameters")
        next(iter(self.optimizers.values())).load_state_dict({"state": saved[0]["state"],
                                                              "param_groups": current[0]["param_groups"]})

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, *, resume: bool = False) -> dict:
        last = self.ckpt_dir / "last.pt"
        if resume and (last.exists() or previous_path(last).exists()):
            self.restore(load_checkpoint(last, action="resuming from"))
            if self.rank == 0:
                truncate_log(self.run_dir / "log.jsonl", self.step)
        tc = self.cfg["train"]
        log = open(self.run_dir / "log.jsonl", "a") if self.rank == 0 else None
        writer = SummaryWriter(str(self.run_dir / "tb")) if self.rank == 0 else None
        bar = tqdm(total=self.steps, initial=self.step, desc=self.run_dir.name, dynamic_ncols=True,
                   disable=not self.progress or self.rank != 0)
        self.method.train()
        t0 = self.segment_t0 = time.perf_counter()
        try:
            while self.step < self.steps:
                batch = self.labelled.batch(self.step, tc["batch_size"], rank=self.rank)
                if self.unlabelled is not None:
                    batch["unlabelled"] = self.unlabelled.batch(  # UniMatch draws two batches (its CutMix partners)
                        self.step, tc["unlabelled_batch_size"] * self.method.unlabelled_draws,
                        rank=self.rank)["image"]
                batch = {k: self.to_device(v) for k, v in batch.items()}
                self.generator.manual_seed(hash_seed(self.seed, self.step, self.rank, *self.stage_key))
                for o in self.optimizers.values():
                    o.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(tc["amp"])):
                    loss, logs = self.model(batch, step=self.step, total_steps=self.steps,
                                            generator=self.generator)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"step {self.step}: loss is {loss.item()}; stopped, last good checkpoint kept in "
                        f"{self.ckpt_dir} (lower train.lr?)")
                if loss.requires_grad:  # a method may have back-propagated its terms early (memory)
                    loss.backward()
                for o in self.optimizers.values():
                    o.step()
                for s in self.schedulers.values():
                    s.step()
                self.method.after_step(self.step)
                self.step += 1
                logs = {"lr": next(iter(self.optimizers.values())).param_groups[0]["lr"], **logs}
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k != "lr"}, refresh=False)
                if log is not None:
                    log.write(json.dumps({"step": self.step, "time": round(time.perf_counter() - t0, 3),
                                          **logs}) + "\n")
                    log.flush()
                    for k, v in logs.items():
                        writer.add_scalar(f"train/{k}", v, self.step)
                done = self.step == self.steps
                # validate before saving last.pt, so that it records the best score so far: a run killed
                # anywhere in between resumes from the previous last.pt and redoes the same validation
                if self.validate and (done or (self.val_every and self.step % self.val_every == 0)):
                    self.run_validation(writer, log)
                if done or self.step % tc["ckpt_every"] == 0:
                    self.save("last.pt")
        finally:
            bar.close()
            if log is not None:
                log.close()
                writer.close()
        return {"step": self.step, "best_val_dice": self.best, "earlier_s": self.earlier_s}

    def run_validation(self, writer, log) -> bool:
        """Validation Dice of each predictor; keeps best.pt by the best of them. True if it improved."""
        t0 = time.perf_counter()
        self.method.eval()
        ec = self.cfg["eval"]
        scores = {}
        tc = self.cfg["train"]
        cases = distributed.shard(self.data.val[:tc["val_cases"] or None], self.rank, self.world)
        overlap = ec["overlap"] if tc["val_overlap"] is None else tc["val_overlap"]
        for name, fn in self.method.predictors().items():
            per_case = evaluate_cases(fn, cases, data_cfg=self.cfg["data"], dims=self.cfg["data"]["dims"],
                                      patch=self.cfg["train"]["patch"], overlap=overlap,
                                      sw_batch_size=ec["sw_batch_size"], full=False, device=self.device)
            per_case = distributed.gather_dict(per_case)
            scores[name] = float(np.mean([m["dice"] for m in per_case.values()]))
        pseudo = self.monitor(self.method.pseudo_labellers(), self.device) if self.monitor is not None else {}
        self.method.train()
        dice = max(scores.values())
        improved = dice > self.best
        if improved:
            self.best = dice
            self.save("best.pt")
        if self.rank != 0:
            return improved
        for name, v in scores.items():
            writer.add_scalar(f"val/dice_{name}", v, self.step)
        for key, v in pseudo.items():  # pl_<labeller>_<metric> -> pseudo_labels/<labeller>_<metric>
            writer.add_scalar(f"pseudo_labels/{key.removeprefix('pl_')}", v, self.step)
        log.write(json.dumps({"step": self.step, **{f"val_dice_{k}": v for k, v in scores.items()}, **pseudo,
                              "val_s": round(time.perf_counter() - t0, 3)}) + "\n")
        return improved


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint being resumed: they are about to be redone."""
    if path.is_file():
        path.write_text("".join(json.dumps(e) + "\n" for e in log_entries(path) if e.get("step", 0) <= step))


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers: every (seed, step, rank) gets its own random stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))
