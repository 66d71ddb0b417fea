"""Plan a run config for a dataset folder, as nnU-Net plans one: detect the layout, read the geometry and the
labels, then choose the network, its image size and the split.

Why: a user's own data should train without a YAML file. The plan starts from the shipped protocols' measured
settings (la2d for 2D networks, la3d-full for 3D ones, with their per-method overrides) and changes only what the
data decide, so the result is a normal full config: printed, written into the run folder, and changeable by --set.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ..errors import InputError
from .case import CaseRef
from .readers import LAYOUTS, detect_format, discover, load_case, read_dataset_json, read_mask
from .splits import make_split

SAMPLE = 12  # cases read for the geometry and the class count: enough for a median, seconds on large volumes
MAX_2D = 256  # long side of a 2D network's images
PATCH_3D = (112, 112, 80)  # the literature's 3D patch (la3d-full): the shortest axis gets the last size
MULTIPLE = 16  # sizes divisible by 2^4: the protocols' 5-level U-Nets
VAL_CAP = {2: 30, 3: 16}  # validation cases at most: PH2's 30 images, LA's 16 volumes
PROTOCOL_FOR = {2: "la2d", 3: "la3d-full"}  # the shipped protocol each network dimensionality starts from
SEMI_SHARE = 0.1  # labelled share when every case has a label but the method learns from unlabelled ones
LOOKED_FOR = ("dataset.json + imagesTr/ (nnU-Net), images/ + labels/ (volumes or 2D images), "
              "<case>/mri_norm2.h5 (LA), PH2 or GlaS")


def _sample(refs: list[CaseRef], n: int = SAMPLE) -> list[CaseRef]:
    """Up to n cases spread evenly over the sorted list."""
    return [refs[i] for i in sorted({round(k * (len(refs) - 1) / max(n - 1, 1)) for k in range(min(n, len(refs)))})]


def _fit(shape: list[float], cap: int) -> list[int]:
    """Shape scaled down so its long side is at most `cap`, each side a multiple of MULTIPLE."""
    factor = min(1.0, cap / max(shape))
    return [max(MULTIPLE, int(s * factor / MULTIPLE + 0.5) * MULTIPLE) for s in shape]


def _geometry(refs: list[CaseRef]) -> tuple[list[float], list[float], int, bool]:
    """Median shape and spacing, channels, and whether the spacing varies (over a sample of the cases)."""
    cases = [load_case(r, with_label=False) for r in _sample(refs)]
    shapes = np.array([c.spatial_shape for c in cases], float)
    if len({c.spatial_dims for c in cases}) > 1:
        raise InputError(f"{cases[0].source}: the dataset mixes 2D and 3D images")
    spacings = np.array([c.spacing for c in cases], float)
    spacing = np.median(spacings, axis=0)
    varies = bool(np.any(np.abs(spacings - spacing) > 0.01 * spacing))
    return np.median(shapes, axis=0).tolist(), spacing.tolist(), cases[0].image.shape[0], varies


def _classes(fmt: str, root: Path, labelled: list[CaseRef]) -> tuple[int, str]:
    """K with background, and where it came from: dataset.json, the format's rule, or the masks' largest value."""
    if fmt == "nnunet":
        return read_dataset_json(root)["num_classes"], "dataset.json"
    if fmt in ("glas", "ph2"):
        return 2, "foreground vs background"
    top = max((int(read_mask(r.label)[0].max()) for r in _sample(labelled)), default=1)
    return max(2, top + 1), f"largest label value {top} in {min(len(labelled), SAMPLE)} masks"


def _split(n_with: int, n_without: int, src_dims: int, semi: bool, labelled: int | None) -> tuple[int, int, str]:
    """(validation, labelled) counts and a note: 20 % validation (capped), then every other labelled case, or a
    tenth of them where the method needs unlabelled cases and none lacks a label."""
    val = min(VAL_CAP[src_dims], max(1, round(0.2 * n_with))) if n_with >= 2 else 0
    rest = n_with - val
    note = ""
    if labelled is not None:
        if not 1 <= labelled <= rest:
            raise InputError(f"--labelled {labelled}: must be 1..{rest} ({n_with} cases have labels, {val} "
                             "of them validate)")
        count = labelled
    elif n_without or not semi:
        count = rest
    else:
        count = max(1, round(SEMI_SHARE * rest))
        note = f"; every case has a label: {SEMI_SHARE:.0%} labelled, the others' withheld (--labelled N)"
    if semi and count >= rest and not n_without:
        raise InputError(f"the method learns from unlabelled cases, but {count} labelled of {rest} training cases "
                         "leaves none; pass --labelled N with N < " + str(rest))
    return val, count, note


def plan_config(root: str | Path, *, method: str = "superdiffusion", dims: int | None = None,
                labelled: int | None = None, overrides: list[str] = (), out: str | Path | None = None,
                method_settings: bool = True) -> tuple[dict, list[str]]:
    """A full run config for the dataset in `root`, and the plan in a few lines (`out`: where it is written).

    method_settings=False leaves out the protocol's settings for `method` (a bench applies each method's own)."""
    from ..bench.protocols import apply, load_protocol
    from ..config import merge, parse_sets
    from ..engine.run import check_config
    from ..methods import method_class

    cls = method_class(method)
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"{root}: data folder {'is not a folder' if root.exists() else 'does not exist'}")
    fmt = detect_format(root)
    if fmt is None:
        inner = [p for p in root.iterdir() if not p.name.startswith(".")]
        more = f"; it holds one folder: try --data {inner[0]}" if len(inner) == 1 and inner[0].is_dir() else ""
        raise InputError(f"{root}: no dataset layout recognised (looked for {LOOKED_FOR}){more}")
    refs = discover(fmt, root)
    with_label = [r for r in refs if r.label is not None]
    if not with_label:
        raise InputError(f"{root}: none of the {len(refs)} cases has a label file (training needs some)")
    shape, spacing, channels, varies = _geometry(refs)
    classes, source = _classes(fmt, root, with_label)
    src_dims, net_dims = len(shape), dims or 2
    if net_dims not in (2, 3) or (net_dims == 3 and src_dims == 2):
        raise InputError(f"--dims {net_dims}: must be 2 or 3 (3 only for 3D volumes; {root} holds {src_dims}D)")
    semi = cls.uses_unlabelled and not getattr(cls, "all_labelled", False)
    n_val, n_lab, note = _split(len(with_label), len(refs) - len(with_label), src_dims, semi, labelled)

    proto = load_protocol(PROTOCOL_FOR[net_dims])
    cfg = copy.deepcopy(proto.base)
    cfg["method"] = method
    if method_settings:
        apply(cfg, proto.methods.get(method, {}), where=f"{proto.path}: methods.{method}")
    data = {"format": fmt, "root": str(root), "list": None, "subset": None, "dims": net_dims,
            "num_classes": classes, "scale": None, "size": None, "spacing": None}
    if net_dims == 2 and src_dims == 3:  # slices along the coarsest axis (nnU-Net's in-plane); ties: the shortest
        axis = max(range(3), key=lambda a: (round(spacing[a], 3), -shape[a], a))
        plane = _fit([s for a, s in enumerate(shape) if a != axis], MAX_2D)
        data.update(slice_axis=axis, size=[None if a == axis else plane.pop(0) for a in range(3)])
        patch = [s for s in data["size"] if s is not None]
        why = "coarsest spacing" if spacing[axis] > 1.001 * min(spacing) else "fewest voxels, equal spacings"
        net = f"2D U-Net on slices along axis {axis} ({why}), resized to {'x'.join(map(str, patch))}"
    elif net_dims == 2:
        data["size"] = patch = _fit(shape, MAX_2D)
        net = f"2D U-Net, images resized to {'x'.join(map(str, patch))}"
    else:
        shortest = int(np.argmin(shape))
        patch = [min(PATCH_3D[2] if a == shortest else PATCH_3D[0], -(-int(round(s)) // MULTIPLE) * MULTIPLE)
                 for a, s in enumerate(shape)]
        data["spacing"] = [round(s, 4) for s in spacing] if varies else None
        net = (f"3D U-Net, {'x'.join(map(str, patch))} patches (sliding window)"
               + (f", resampled to spacing {'x'.join(f'{s:g}' for s in data['spacing'])}" if varies else ""))
    merge(cfg, {"data": data, "split": {"labelled": n_lab, "val": n_val, "seed": 0},
                "train": {"patch": patch, "val_every": (cfg["train"]["val_every"] or 1000) if n_val else 0},
                "eval": {"monitor_pseudo_labels": 0}}, where="plan")
    merge(cfg, parse_sets(list(overrides)), where="--set")
    check_config(cfg)
    no_label = {r.id for r in refs if r.label is None}
    split = make_split([r.id for r in refs], labelled=cfg["split"]["labelled"], val=cfg["split"]["val"],
                       seed=cfg["split"]["seed"], label_less=no_label)

    t, dim, size = cfg["train"], "x".join(f"{s:g}" for s in spacing), "x".join(f"{s:g}" for s in shape)
    batch = f"batch {t['batch_size']}" + (f" + {t['unlabelled_batch_size']} unlabelled" if semi else "")
    lines = [f"layout:   {LAYOUTS[fmt]} in {root} (data.format {fmt})",
             f"cases:    {len(refs)}: {len(split['val'])} validation, {len(split['labelled'])} labelled, "
             f"{len(split['unlabelled'])} unlabelled ({len(no_label)} without a label file){note}",
             f"geometry: {src_dims}D, {channels} channel{'s' * (channels > 1)}, median shape {size}, "
             f"spacing {dim}{' (varies)' if varies else ''}; {classes} classes ({source})",
             f"network:  {net}",
             f"method:   {method} ({proto.name} protocol's settings), {t['steps']} steps, {batch}"]
    if out is not None:
        lines.append(f"config:   {out}")
    return cfg, lines
