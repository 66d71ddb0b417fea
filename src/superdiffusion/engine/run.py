"""A training run: check the config and every input, split, train each stage, evaluate, record.

Run folder layout (final stage at the top, earlier pipeline stages in sub-folders):
    config.yaml  split.json  log.jsonl  tb/  checkpoints/{last,best}.pt  results.json
    pretrain/    (stage 1 of the SuperDiffusion pipeline: its own log, tb and checkpoints)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..config import dump_config, read_stored_config
from ..data.pipeline import AUGMENTATIONS, DataBundle, build_data
from ..data.splits import write_split
from ..errors import InputError
from ..evaluation.inference import evaluate_cases
from ..evaluation.metrics import summarize
from ..methods import METHODS, build_method, method_class
from ..methods.base import DICE_FORMS, Stage
from ..nets.unet import ARCHS
from ..outputs import check_output_dir
from . import distributed, host
from .trainer import Trainer

DONE = "DONE"


def check_config(cfg: dict) -> None:
    """Value checks that need no data; each names the key at fault."""
    method_class(cfg["method"])
    d, t = cfg["data"], cfg["train"]
    if d["dims"] not in (2, 3):
        raise InputError(f"data.dims: {d['dims']!r} must be 2 or 3")
    if not isinstance(d["num_classes"], int) or d["num_classes"] < 2:
        raise InputError(f"data.num_classes: {d['num_classes']!r} must be an integer >= 2")
    if not isinstance(t["patch"], list) or len(t["patch"]) != d["dims"]:
        raise InputError(f"train.patch: {t['patch']!r} must list {d['dims']} sizes")
    codes = d["orientation"]
    if codes is not None and not (isinstance(codes, str) and len(codes) == 3 and
                                  {c.upper() for c in codes} in ({"R", "A", "S"}, {"L", "P", "S"}, {"L", "A", "S"},
                                                                 {"R", "P", "S"}, {"R", "A", "I"}, {"L", "P", "I"},
                                                                 {"L", "A", "I"}, {"R", "P", "I"})):
        raise InputError(f"data.orientation: {codes!r} must be three axis codes, one per direction, such as RAS "
                         "or LPS")
    if cfg["method"] == "bcp" and min(t["batch_size"], t["unlabelled_batch_size"]) < 2:
        raise InputError(f"train.batch_size / unlabelled_batch_size: {t['batch_size']} / "
                         f"{t['unlabelled_batch_size']}; bcp mixes the halves of each batch, so both must be >= 2")
    if cfg["bcp"]["pretrain_checkpoint"] not in ("last", "best"):
        raise InputError(f"bcp.pretrain_checkpoint: {cfg['bcp']['pretrain_checkpoint']!r} must be last or best")
    m = cfg["model"]
    if m["arch"] not in ARCHS:
        raise InputError(f"model.arch: unknown {m['arch']!r} ({', '.join(ARCHS)})")
    cls = method_class(cfg["method"])
    if m["arch"] == "ssl4mis" and cls.reads_diffusion and getattr(cls, "uses_teacher", True):
        raise InputError(f"model.arch: ssl4mis is a segmentation U-Net without a timestep input; {cfg['method']} "
                         "needs monai or double-conv")
    if m["arch"] == "monai" and m["time_embedding"] != "stem":
        raise InputError(f"model.time_embedding: {m['time_embedding']!r} needs model.arch double-conv (monai: stem)")
    rates = m["dropout"] if isinstance(m["dropout"], list) else [m["dropout"]]
    if any(isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r < 1 for r in rates) or \
            (isinstance(m["dropout"], list) and len(rates) != len(m["channels"])):
        raise InputError(f"model.dropout: {m['dropout']!r} must be a number in [0, 1), or one per level "
                         f"({len(m['channels'])})")
    divisor = 2 ** (len(m["channels"]) - 1)
    if any(not isinstance(p, int) or p <= 0 or p % divisor for p in t["patch"]):
        raise InputError(f"train.patch: {t['patch']} sizes must be positive multiples of {divisor} "
                         f"for a {len(cfg['model']['channels'])}-level U-Net")
    if t["dice"] not in DICE_FORMS:
        raise InputError(f"train.dice: unknown {t['dice']!r} ({', '.join(DICE_FORMS)})")
    if t["augment"] not in AUGMENTATIONS:
        raise InputError(f"train.augment: {t['augment']!r} must be one of {', '.join(map(str, AUGMENTATIONS))}")
    for key in ("steps", "batch_size", "unlabelled_batch_size"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise InputError(f"train.{key}: {t[key]!r} must be a positive integer")
    if isinstance(t["val_cases"], bool) or not isinstance(t["val_cases"], int) or t["val_cases"] < 0:
        raise InputError(f"train.val_cases: {t['val_cases']!r} must be an integer >= 0 (0: every validation case)")
    for key, value in (("eval.overlap", cfg["eval"]["overlap"]), ("train.val_overlap", t["val_overlap"])):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1):
            raise InputError(f"{key}: {value!r} must be a number in [0, 1)")
    for key, value in (("train.lr", t["lr"]), ("superdiffusion.pretrain_lr", cfg["superdiffusion"]["pretrain_lr"])):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InputError(f"{key}: {value!r} must be a positive number")
    if isinstance(t["weight_decay"], bool) or not isinstance(t["weight_decay"], int | float) or t["weight_decay"] < 0:
        raise InputError(f"train.weight_decay: {t['weight_decay']!r} must be a number >= 0")
    dc = cfg["diffusion"]
    if not isinstance(dc["timesteps"], int) or dc["timesteps"] < 1:
        raise InputError(f"diffusion.timesteps: {dc['timesteps']!r} must be a positive integer")
    if dc["inference"] not in ("fixed", "ddim", "ensemble"):
        raise InputError(f"diffusion.inference: unknown {dc['inference']!r} (fixed, ddim, ensemble)")
    for key, lo, hi in (("t_infer", 0, dc["timesteps"] - 1), ("ddim_steps", 1, dc["timesteps"]),
                        ("ensemble", 1, 1000)):
        if not isinstance(dc[key], int) or not lo <= dc[key] <= hi:
            raise InputError(f"diffusion.{key}: {dc[key]!r} must be an integer in {lo}..{hi}")
    if cfg["eval"]["checkpoint"] not in ("best", "last"):
        raise InputError(f"eval.checkpoint: {cfg['eval']['checkpoint']!r} must be best or last")


def prepare_run_dir(cfg: dict, run_dir: Path, *, resume: bool) -> None:
    """Never overwrite a run: a new run needs a new folder; --resume needs the same config."""
    stored = run_dir / "config.yaml"
    if resume:
        if not stored.is_file():
            raise InputError(f"{run_dir}: nothing to resume (no config.yaml)")
        diff = config_changes(read_stored_config(stored), cfg)
        if diff:
            raise InputError(f"{run_dir}: the config differs from the run's own ({', '.join(diff)}); "
                             "resume with the same config or start a new run folder")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise InputError(f"{run_dir}: run folder exists and is not empty; pass --resume to continue it "
                         "or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, stored)


# Keys that change how a process runs but not one number it computes: a run may resume with them changed.
NEUTRAL_KEYS = frozenset({"train.hold_memory", "eval.monitor_pseudo_labels"})


def config_changes(old: dict, new: dict) -> list[str]:
    """The dotted keys whose values differ (sorted), neutral keys left out, and the diffusion sections when neither
    config's method reads them (a protocol's SuperDiffusion settings do not touch its supervised runs)."""
    reads = [getattr(METHODS.get(c.get("method")), "reads_diffusion", True) for c in (old, new)]
    unread = () if any(reads) else ("diffusion.", "superdiffusion.")
    return sorted(k for k in _diff_keys(old, new) if k not in NEUTRAL_KEYS and not k.startswith(unread))


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def train_run(cfg: dict, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train every stage of cfg.method in run_dir, then evaluate on the validation split."""
    check_config(cfg)
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") == "0":  # rank 0 alone writes the run (and another rank's probe would race)
        check_output_dir(run_dir)  # before the data is read: an unusable --out is one line, not a traceback
    if cfg["train"]["threads"]:
        torch.set_num_threads(int(cfg["train"]["threads"]))
    if cfg["train"]["hold_memory"]:
        host.hold_freed_memory()
    cls = method_class(cfg["method"])
    data = build_data(cfg, all_labelled=getattr(cls, "all_labelled", False))  # every input checked here
    rank, _ = distributed.init()
    if rank == 0:
        prepare_run_dir(cfg, run_dir, resume=resume)
        write_split(data.split, run_dir / "split.json")
    distributed.barrier()
    t0 = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    method = build_method(cfg, in_channels=data.in_channels)
    stages = method.stages()
    carried = []  # the checkpoints whose optimiser state the final method goes on with
    earlier_s = 0.0  # training seconds spent before this process (earlier segments of a resumed run)
    for index, stage in enumerate(stages, 1):  # earlier stages of a pipeline (SuperDiffusion's pre-training)
        checkpoint, stage_earlier_s = run_stage(stage, cfg, data, run_dir / stage.folder, index=index,
                                                resume=resume, progress=progress)
        earlier_s += stage_earlier_s
        if stage.carry_optimizer:  # BCP's self-training goes on with its pre-training's momentum
            carried.append(checkpoint)
    method.after_stages()  # before fit(): a resumed run's checkpoint then overrides what this sets
    trainer = Trainer(method, cfg, data, run_dir, progress=progress)
    for checkpoint in carried:
        trainer.carry_optimizer_state(checkpoint)
    summary = trainer.fit(resume=resume)  # a resumed run's own checkpoint overrides the carried state
    results = {"steps": summary["step"], "rank": rank}
    if rank == 0:  # rank 0 alone evaluates and records
        results = final_evaluation(method, cfg, data, run_dir)
        earlier_s += summary["earlier_s"]  # the total over every segment, not only this one's
        results.update(steps=summary["step"], wall_time_s=round(time.perf_counter() - t0 + earlier_s, 1))
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        (run_dir / DONE).write_text("ok\n")
    distributed.wait_for_rank0()
    return results


def run_stage(stage: Stage, cfg: dict, data: DataBundle, stage_dir: Path, *, index: int, resume: bool,
              progress: bool) -> tuple[dict, float]:
    """Train a pipeline stage in its sub-folder (its own random draws: `index`, 1 for the first); once finished
    (DONE), later runs just reload it. Returns the checkpoint it hands on, its weights loaded into the method, and
    the stage's training seconds spent before this process (all of them for a stage finished earlier)."""
    finished = (stage_dir / DONE).is_file()
    if not finished:
        stage_dir.mkdir(parents=True, exist_ok=True)
        earlier_s = Trainer(stage.method, cfg, data, stage_dir, lr=stage.lr, steps=stage.steps, progress=progress,
                            stage=index, validate=stage.val_every > 0,
                            val_every=stage.val_every).fit(resume=resume)["earlier_s"]
        if distributed.rank_world()[0] == 0:
            (stage_dir / DONE).write_text("ok\n")
        distributed.barrier()
    path, last = stage_checkpoint(stage, stage_dir), stage_dir / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(path)
    if finished:  # its whole training time was spent earlier; last.pt holds it
        earlier_s = float((checkpoint if path == last else load_checkpoint(last)).get("elapsed_s", 0.0))
    stage.method.load_state_dict(checkpoint["model"])
    return checkpoint, earlier_s


def stage_checkpoint(stage: Stage, stage_dir: Path) -> Path:
    """The checkpoint a finished stage hands on: its last, or its best on validation where it validated."""
    best = stage_dir / "checkpoints" / "best.pt"
    return best if stage.checkpoint == "best" and best.exists() else stage_dir / "checkpoints" / "last.pt"


def final_evaluation(method, cfg: dict, data: DataBundle, run_dir: Path) -> dict:
    """Load the chosen checkpoint, pick the predictor by validation Dice, full metrics on validation."""
    rule = cfg["eval"]["checkpoint"]
    path = run_dir / "checkpoints" / f"{rule}.pt"
    if rule == "best" and not path.exists():
        rule, path = "last", run_dir / "checkpoints" / "last.pt"  # no validation split: nothing to pick by
    method.load_state_dict(load_checkpoint(path)["model"])
    method.eval()
    results = {"checkpoint": rule, "checkpoint_rule": "best validation Dice" if rule == "best" else "last step",
               "threshold": "argmax (foreground probability > 0.5 for binary)", "split": data.split,
               "labelled_cases": len(data.split["labelled"]), "seed": cfg["seed"]}
    if not data.val:
        results["predictor"] = choose_predictor(method, cfg, {})
        return results
    per_predictor = {}
    for name, fn in method.predictors().items():
        per_case = evaluate_cases(fn, data.val, data_cfg=cfg["data"], dims=cfg["data"]["dims"],
                                  patch=cfg["train"]["patch"], overlap=cfg["eval"]["overlap"],
                                  sw_batch_size=cfg["eval"]["sw_batch_size"],
                                  device=next(method.parameters()).device)
        per_predictor[name] = {"per_case": per_case, "mean": summarize(per_case)}
    predictor = choose_predictor(method, cfg, {k: v["mean"]["dice"]["mean"] for k, v in per_predictor.items()})
    results.update(predictor=predictor, val=per_predictor)
    return results


def choose_predictor(method, cfg: dict, val_dice: dict[str, float]) -> str:
    names = list(method.predictors())
    wanted = cfg["eval"]["predictor"]
    if wanted == "first":  # the method's own default: no choice made on validation cases
        return names[0]
    if wanted != "auto":
        if wanted not in names:
            raise InputError(f"eval.predictor: {wanted!r} not offered by {cfg['method']} ({', '.join(names)})")
        return wanted
    return max(val_dice, key=lambda k: (val_dice[k], -names.index(k))) if val_dice else names[0]


def mean_table(results: dict) -> dict[str, float]:
    """Mean validation metrics of the chosen predictor."""
    m = results["val"][results["predictor"]]["mean"]
    return {k: float(np.round(m[k]["mean"], 4)) for k in ("dice", "jaccard", "hd95", "asd")}
