"""Run configuration: plain nested data (YAML in, JSON-able dict out), with documented defaults.

Configs never name Python objects: every choice is a string picked from a fixed registry, so loading
a config cannot run code. Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, but `1e-3` is a float (as in YAML 1.2 and every user's expectation)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass: plain data only

DEFAULTS: dict[str, Any] = {
    "seed": 0,  # seeds the split shuffle, the initial weights and every training sample
    "method": "supervised",  # supervised | fully-supervised | pretrain | cotrain | superdiffusion
    "data": {
        "format": "synthetic",  # la | volumes | nnunet | folders | glas | ph2 | synthetic
        "root": None,  # dataset folder; relative paths are resolved against the current directory
        "list": None,  # optional list file of case ids (relative to root if not found as given)
        "subset": None,  # glas: train | testA | testB | test; nnunet: train (imagesTr) | test (imagesTs)
        "dims": 2,  # network dimensionality; 2 with a 3D source means slices (split by case)
        "slice_axis": 2,  # spatial axis of 3D volumes that 2D slices are cut along (LA: 2 = axial z)
        "num_classes": 2,  # K, background included; labels must lie in 0..K-1
        "scale": None,  # per spatial axis resampling factor, e.g. [0.5, 0.5, 1.0]; null = none
        # fixed size per spatial axis that every case is resampled to, e.g. [96, 96, null] (null keeps that axis);
        # null = none. Either scale or size. Predictions are resampled back to each case's own grid.
        "size": None,
        # target voxel size per spatial axis (in the files' units, e.g. [1.0, 1.0, 1.0] mm; null keeps an axis): every
        # case resampled to it, as nnU-Net and MONAI's Spacing do; null = none. One of scale, size, spacing.
        "spacing": None,
        # turn every 3D case with a geometry (NIfTI, NRRD, MHA) to these axis codes first, e.g. RAS (MONAI's
        # Orientation); predictions are turned back. null = the files' own voxel order. slice_axis counts axes after it
        "orientation": None,
        "intensity": "percentile",  # percentile: clip to [0.5, 99.5] % and map to [-1, 1]; zscore
        "synthetic": {"cases": 24, "shape": [64, 64], "seed": 0},  # the built-in demo data
    },
    "split": {
        "labelled": 0.1,  # fraction (< 1) of the training cases, or a count (>= 1) of labelled cases
        "val": 0.2,  # fraction or count of cases carved out for validation (0 = none)
        "seed": 0,  # split seed: ids are sorted, then shuffled with it
    },
    "model": {
        # monai: MONAI's UNet, one conv per level, strided first conv (fast) | double-conv: two convs per level, the
        # stem at full resolution (the earlier default, 4-6x slower per pixel; runs made before this key keep it)
        "arch": "monai",
        "channels": [16, 32, 64, 128],  # U-Net widths per level (depth = len)
        "norm": "batch",  # batch | instance | group
        # dropout (arch monai): one rate for every convolution, or one per encoder level and none in the decoder
        # (SSL4MIS's 2D U-Net: [0.05, 0.1, 0.2, 0.3, 0.5])
        "dropout": 0.0,
        "time_embedding": "stem",  # diffusion nets: stem (added once, the reference) | blocks
    },
    "train": {
        "steps": 1000,  # optimiser steps (the budget is in iterations, not epochs)
        "batch_size": 8,  # labelled samples per step
        "unlabelled_batch_size": 8,  # unlabelled samples per step (semi-supervised methods)
        "patch": [64, 64],  # training crop size (pads when the image is smaller)
        "fg_oversample": 0.33,  # probability that a labelled crop is centred on foreground
        "augment": True,  # true: random flips and 90-degree rotations in-plane | false | ssl4mis (its RandomGenerator)
        "photometric": False,  # labelled crops: random intensity scale/shift, gamma, blur and noise (data/perturb.py)
        "optimizer": "adam",  # adam | adamw | sgd (momentum 0.9, as the originals of the baselines)
        "dice": "image",  # the supervised terms' Dice: image (MONAI's, per image) | batch-squared (SSL4MIS's)
        "lr": 1e-3,
        "weight_decay": 0.0,
        "lr_schedule": "poly",  # poly | cosine | constant (after warm-up)
        "warmup": 0,  # linear warm-up steps
        "val_every": 100,  # validation period in steps (0 = only at the end)
        # validation during training on the first val_cases cases of the validation split (0 = all) with this
        # sliding-window overlap (null = eval.overlap): a cheap look for 3D runs, where a whole-volume pass at 0.5
        # overlap costs seconds per case; the final evaluation uses every case. With eval.checkpoint best, best.pt is
        # chosen on this subset (the protocols report the last checkpoint: there it only monitors)
        "val_cases": 0,
        "val_overlap": None,
        "ckpt_every": 100,  # checkpoint period in steps
        "threads": None,  # torch threads per process (null = leave torch's default)
        "device": "auto",  # auto (cuda when available) | cpu | cuda
        "amp": False,  # bf16 autocast in training steps: for GPUs (on CPUs without bf16 units it is slower)
        "compile": False,  # torch.compile every U-Net (pays off only on long runs: 40-140 s to compile)
        "channels_last": False,  # channels-last memory format for the networks and batches
        "hold_memory": False,  # CPU: keep freed memory for the next step (1.07-1.27x faster, ~0.1 GiB more peak)
    },
    "eval": {
        "checkpoint": "best",  # best (best validation Dice) | last
        "overlap": 0.5,  # sliding-window overlap
        "sw_batch_size": 4,
        # auto (the better one on validation) | first (the method's default: student, net1; chosen without validation
        # cases) | a predictor's name (student, teacher, ...)
        "predictor": "auto",
        # pseudo-label monitor: at each validation, score every pseudo-labeller of the method on this many slices
        # (2D) or patches (3D) of the unlabelled cases against their withheld labels (engine/monitor.py); they never
        # reach a loss. 0 = off; needs label files for the unlabelled cases (benchmarks such as LA have them)
        "monitor_pseudo_labels": 0,
    },
    "diffusion": {
        "timesteps": 1000,
        "schedule": "sigmoid",  # linear | cosine | sigmoid (the reference's)
        "inference": "fixed",  # fixed (one pass at t_infer, fixed noise seed) | ddim | ensemble
        "t_infer": 999,  # timestep of the single-pass inference
        "ddim_steps": 5,
        "ensemble": 5,  # samples in an ensemble prediction
        "noise_seed": 0,  # seed of the inference noise: repeated calls give identical masks
    },
    "superdiffusion": {
        "pretrain_steps": 500,  # stage 1 (cycle loss) steps when method = superdiffusion
        "pretrain_lr": 1e-3,
        "student": "unet",  # unet (a plain U-Net) | twin (the teacher's mask pathway, as the reference)
        "rounds": 3,  # R, pseudo-label rounds
        "round_mode": "independent",  # independent (reference) | chained (abstract)
        "round_weight": 1.0,  # lambda; each round's terms weigh lambda / R
        # cost levers: the teacher learns (supervised, CPS, rounds) on every teacher_every-th step only, and between
        # them only pseudo-labels, without a graph; the rounds take the first round_images images of each batch
        # (None: all); the teacher's channels are model.channels x teacher_width (the twin student's too)
        "teacher_every": 1,
        "round_images": None,
        "teacher_width": 1.0,
        "unlabelled_weight": 1.0,  # final weight of the CPS term, ramped linearly from 0
        # pseudo-label pixels whose source's top probability is below this teach nothing (0: off, the reference;
        # FixMatch's confidence mask; needs cps_loss ce or dice-masked)
        "confidence": 0.0,
        # decay of an EMA copy of the student (0: none, the reference): with it the EMA pseudo-labels for the
        # teacher, and the student learns the argmax of the teacher's and the EMA's mean probabilities
        "ema": 0.0,
        # with an EMA student, what the student learns on the unlabelled images: consensus (the argmax of the teacher's
        # and the EMA's mean probabilities) | ema (the EMA's alone: the ablation of the teacher's pseudo-labels; the
        # teacher still learns, from the EMA's) | fill (the EMA's where it is confident, else the teacher's where it is)
        # | agree (the EMA's where the teacher's argmax agrees, no label elsewhere) | rectified (the EMA's soft label
        # refined by the mask pathway: rectify; the EMA's alone before rectify_after)
        "student_target": "consensus",
        # rectification (DiffRect's idea): the mask pathway also learns, on the labelled images, to map the EMA's soft
        # label noised at a random t in [0, rectify] (and the image) to the true label; the EMA's labels of unlabelled
        # images noised at rectify / 2 then pass through it once (SDEdit-style). 0: off. Needs an EMA student
        "rectify": 0,
        "rectify_after": 0.25,  # share of the co-training steps before the student learns the rectified labels
        # generative strong view: the student learns the EMA's label of each unlabelled image on the image pathway's
        # one-pass re-synthesis of it from this noise level (SDEdit-style, conditioned on that soft label, so the
        # label still describes it), before the photometric view and CutMix; the image pathway keeps learning to
        # denoise the labelled images conditioned on their labels. 0: off. Needs an EMA student and mask_condition
        # probabilities
        "generative_view": 0,
        # on argmax pseudo-labels (CPS, rounds): dice (reference, per image) | dice-batch | ce | dice-masked (per class
        # over the batch on the confident pixels: UniMatch's medical loss)
        "cps_loss": "dice",
        # what the CPS term's networks see of an unlabelled image: same (the reference: the image whose argmax is the
        # other network's pseudo-label) | photometric (a perturbed view: intensity, gamma, blur, noise; FixMatch)
        "unlabelled_view": "same",
        # probability that an unlabelled image of the CPS term takes a box of another one (UniMatch's CutMix: its
        # pseudo-labels mixed by the same box; 0: off, the reference; la2d measured 0.5 and left it off: docs/DESIGN.md)
        "cutmix": 0.0,
        # what the image pathway is conditioned on: probabilities (the mask pathway's softmax mapped to [-1, 1], the
        # labels' range) | logits (the reference: its raw output; in the cycle pre-training of
        # tests/methods/test_superdiffusion.py its masks were no better than an untrained teacher's, 0.190 vs 0.191
        # best-assignment Dice, where probabilities reach 0.268: an unbounded 2-channel code need not be a mask)
        "mask_condition": "probabilities",
        # how the networks run when they pseudo-label: train (the reference, SSL4MIS's teachers: as they learn,
        # dropout on) | eval (no dropout, batch norm's running statistics: FixMatch's clean weak-view targets)
        "labeller_mode": "train",
        "pretrained": True,  # start co-training from the stage-1 teacher (False = random teacher)
        "init": None,  # path of a stage-1 checkpoint to start co-training from (method = cotrain)
    },
    "bcp": {
        # reduce each pseudo-label image's foreground classes to their largest connected component (their LargestCC):
        # right where an object is one component per image (their 3D LA volumes, their ACDC slices); false where it
        # is not (LA's axial slices: a quarter of them show the atrium in several pieces, its veins)
        "largest_component": True,
        # the stage-1 checkpoint self-training starts from: last (the protocols', since validation never selects) |
        # best (their code's: the best of 50 validations of stage 1, its optimiser state with it; on la2d the same
        # score as last, docs/evidence/la2d-bcp-stage1-best/)
        "pretrain_checkpoint": "last",
    },
}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Defaults <- YAML file <- `key.sub=value` overrides, validated against the defaults' keys."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        merge(cfg, read_yaml(resolve_config_path(path)), where=str(path))
    merge(cfg, parse_sets(list(overrides)), where="--set")
    return cfg


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set key.sub=value` items (values parsed as YAML, as config files are) -> one nested override tree.

    Each item merges into the tree, as into a config: a later one wins, and two mappings set for one key keep both
    (`data.synthetic={cases: 3}` then `data.synthetic={seed: 1}` sets both).
    """
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected key=value, e.g. train.steps=200")
        try:
            parsed = parse_yaml(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise InputError(f"--set {key}: value {value!r} is not valid YAML") from err
        deep_update(tree, dotted_tree({key.strip(): parsed}, where="--set"))
    return tree


def dotted_tree(overrides: dict, *, where: str) -> dict:
    """`{"a.b": 1, "c": {"d": 2}}` -> `{"a": {"b": 1}, "c": {"d": 2}}` (validated later by merge)."""
    if not isinstance(overrides, dict):
        raise InputError(f"{where}: overrides must be a mapping of config keys to values")
    tree: dict = {}
    for key, value in overrides.items():
        *parents, leaf = str(key).split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"{where}: {key!r} clashes with another override")
        if isinstance(value, dict):
            value = dotted_tree(value, where=where)
            if isinstance(node.get(leaf), dict):
                deep_update(node[leaf], value)
                continue
        node[leaf] = value
    return tree


def deep_update(base: dict, update: dict) -> None:
    """base <- update in place, mappings merged key by key, anything else replaced."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v


# Keys whose default changed: a stored config without them was made with these values.
LEGACY_DEFAULTS: dict[str, Any] = {"model.arch": "double-conv"}
# Keys that no longer exist, with why: a stored config that has them still loads (its run was made with the old
# behaviour, which docs/HISTORY.md describes where it reports such runs).
REMOVED_KEYS: dict[str, str] = {
    "superdiffusion.align_unlabelled": "the unlabelled images' round terms are always ramped by w, as the reference's",
    "superdiffusion.student_passes": "labelled and unlabelled batches always take separate passes, as the reference's",
    "superdiffusion.round_every": "replaced by teacher_every (the rounds train only the teacher: its schedule)",
}


def parent_of(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    """The mapping that holds a dotted key's last part (None where the path is absent), and that part."""
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def complete(stored: dict[str, Any], *, where: str) -> dict[str, Any]:
    """A config stored by an earlier version, with keys added since then at their defaults (or, where a new
    key's default is not the old behaviour, at LEGACY_DEFAULTS) and keys removed since then dropped.

    Why: runs made before a key existed still resume, benchmark folders still match, and their checkpoints
    still load.
    """
    if not isinstance(stored, dict):
        raise InputError(f"{where}: a config must be a mapping of keys to values")
    cfg, stored = copy.deepcopy(DEFAULTS), copy.deepcopy(stored)
    for dotted in REMOVED_KEYS:
        node, leaf = parent_of(stored, dotted)
        if node is not None:
            node.pop(leaf, None)
    for dotted, value in LEGACY_DEFAULTS.items():
        here, leaf = parent_of(stored, dotted)
        if here is None or leaf not in here:
            parent_of(cfg, dotted)[0][leaf] = value
    merge(cfg, stored, where=where)
    return cfg


def read_stored_config(path: Path) -> dict[str, Any]:
    """A run's own config.yaml, completed to this version's keys (resume and bench folders compare with it)."""
    return complete(read_yaml(path), where=str(path))


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a config shipped with the package (e.g. `demo`)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = PACKAGE_CONFIGS / f"{p.name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise InputError(f"{path}: config file not found (shipped configs: {', '.join(shipped_configs())})")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config must be a mapping of keys to values")
    return data


def merge(base: dict[str, Any], update: dict[str, Any], *, where: str, prefix: str = "") -> None:
    """Merge `update` into `base` in place; keys unknown to the defaults are refused."""
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            if name in REMOVED_KEYS:
                raise InputError(f"{where}: config key {name!r} was removed: {REMOVED_KEYS[name]}")
            close = difflib.get_close_matches(key, list(base), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise InputError(f"{where}: unknown config key {name!r}{hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise InputError(f"{where}: {name!r} must be a mapping")
            merge(base[key], value, where=where, prefix=name + ".")
        elif isinstance(value, dict):
            raise InputError(f"{where}: unknown config key {name + '.' + next(iter(value), '')!r}"
                             if value else f"{where}: {name!r} is a value, not a mapping")
        else:
            base[key] = value


def dump_config(cfg: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
