"""`evaluate` and `predict`: a run on a labelled dataset, mask folders against mask folders, masks to disk."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.case import Case
from ..data.pipeline import SUFFIX_FORMATS, file_suffix, input_refs, load_cases, require_labels
from ..data.readers import (
    geometry_mismatch,
    load_case,
    mask_path,
    read_geometry,
    read_mask,
    write_array,
    write_mask,
)
from ..errors import InputError
from .inference import segment
from .metrics import METRICS, case_metrics, summarize
from .predict import load_run


def report(per_case: dict[str, dict], **info) -> dict:
    s = summarize(per_case)
    return {**info, "n_cases": len(per_case), "mean": {k: s[k]["mean"] for k in METRICS},
            "std": {k: s[k]["std"] for k in METRICS}, "per_case": per_case}


def evaluate_run(run_dir, data_root, list_file=None, *, fmt=None, checkpoint=None, predictor=None) -> dict:
    run = load_run(run_dir, checkpoint=checkpoint, predictor=predictor)
    data_cfg = copy.deepcopy(run.cfg["data"])
    data_cfg.update(root=str(data_root), list=list_file, format=fmt or data_cfg["format"])
    if data_cfg["format"] == "synthetic":
        raise InputError(f"{run_dir}: trained on synthetic data; pass --format for --data {data_root}")
    cases = load_cases(data_cfg)  # every case read and checked before the first prediction
    require_labels(cases)
    per_case = {c.id: case_metrics(segment(run.probabilities(c)), c.label, spacing=c.spacing,
                                   num_classes=data_cfg["num_classes"]) for c in cases}
    return report(per_case, run=str(run_dir), checkpoint=run.checkpoint.name, predictor=run.predictor,
                  data=str(data_root), list=list_file, threshold="argmax (foreground probability > 0.5)")


def mask_files(folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and file_suffix(p) in SUFFIX_FORMATS:
            files[p.name[: -len(file_suffix(p))]] = p
    if not files:
        raise InputError(f"{folder}: no mask files found")
    return files


def evaluate_folders(pred_dir, gt_dir, *, num_classes: int = 2, ignore_geometry: bool = False,
                     warn=lambda line: print(line, file=sys.stderr)) -> dict:
    """Score every ground-truth mask against the prediction of the same name. Prediction and reference must lie
    on the same grid in space (spacing, direction, origin), unless `ignore_geometry`; predictions without a
    reference are named in a warning and in the report."""
    pred, gt = mask_files(pred_dir), mask_files(gt_dir)
    missing = sorted(set(gt) - set(pred))
    if missing:
        raise InputError(f"{pred_dir}: no prediction for {len(missing)} ground-truth case(s), e.g. {missing[0]}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"--num-classes: {num_classes!r} must be at least 2 (background included)")
    extra = sorted(set(pred) - set(gt))
    if extra:
        warn(f"warning: {len(extra)} prediction(s) in {pred_dir} have no reference in {gt_dir} and are not scored "
             f"(e.g. {pred[extra[0]].name})")
    pairs = {k: (read_mask(pred[k]), read_mask(gt[k])) for k in gt}  # read and check everything first
    for k, ((p, _), (g, _)) in pairs.items():
        if p.shape != g.shape:
            raise InputError(f"{pred[k]}: shape {p.shape} does not match the ground truth {gt[k]} {g.shape}")
        mismatch = None if ignore_geometry else geometry_mismatch(read_geometry(pred[k]), read_geometry(gt[k]))
        if mismatch:
            raise InputError(f"{pred[k]}: not on the grid of its reference {gt[k]} ({mismatch}); resample it, or "
                             "pass --ignore-geometry to score the voxel arrays as they are")
        for path, arr in ((pred[k], p), (gt[k], g)):
            bad = np.unique(arr[(arr < 0) | (arr >= num_classes)])
            if bad.size:
                raise InputError(f"{path}: label value(s) {bad[:5].tolist()} outside 0..{num_classes - 1}")
    per_case = {k: case_metrics(p, g, num_classes=num_classes, spacing=spacing)
                for k, ((p, _), (g, spacing)) in pairs.items()}
    return report(per_case, pred=str(pred_dir), gt=str(gt_dir), unscored_predictions=extra,
                  geometry="ignored" if ignore_geometry else "checked")


def check_output_dir(out_dir: str | Path) -> Path:
    """An output folder that is (or can be created as) a writable folder, or a one-line error before any work
    starts; nothing is created yet."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: --out is a file, not a folder")
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{out_dir}: cannot create this output folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{out_dir}: cannot write to this output folder ({existing} is not writable)")
    return out_dir


def predict_files(run_dir, inputs, out_dir, *, checkpoint=None, predictor=None, mode=None, ddim_steps=None,
                  samples=None, noise_seed=None, uncertainty: bool = False, save_probabilities: bool = False,
                  preview: bool = False, overwrite: bool = False, progress: bool = True,
                  log=print) -> list[Path]:
    """Segment each input and write its mask (and optional extras) in the input's own format.

    predictor: student | teacher (default: the run's choice on validation); mode: the teacher's
    inference (fixed, ddim, ensemble). uncertainty: the std of `samples` teacher passes, as a float map.
    save_probabilities: the foreground probability (`<id>_probability`; `_probability_<k>` per foreground class
    for more classes) as float maps. preview: `<id>_preview.png`, the image with the mask's outline (the
    middle slice of each axis of a volume). A case whose mask exists already in `out_dir` is skipped, so an
    interrupted predict continues into the same folder (the mask is written last, atomically); `overwrite`
    redoes every case.
    """
    out_dir = check_output_dir(out_dir)
    run = load_run(run_dir, checkpoint=checkpoint, predictor=predictor)
    if (mode or uncertainty) and not hasattr(run.method, "teacher"):
        raise InputError(f"{run_dir}: --mode/--uncertainty need a diffusion teacher; {run.cfg['method']} has none")
    if mode and run.predictor != "teacher":
        raise InputError(f"--mode {mode}: applies to the teacher; add --predictor teacher")
    refs = input_refs(inputs)
    ids = [r.id for r in refs]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        same = [str(r.image) for r in refs if r.id == twice[0]]
        raise InputError(f"inputs {same[0]} and {same[1]} both give case id {twice[0]!r}: their masks would collide")
    cases = [run.check_fits(load_case(r, with_label=False)) for r in refs]  # every input read and checked first
    num_classes = run.cfg["data"]["num_classes"]
    fn = run.teacher(mode, steps=ddim_steps, samples=samples, noise_seed=noise_seed) if mode else None
    out_dir.mkdir(parents=True, exist_ok=True)
    done = [c for c in cases if mask_path(c, out_dir).exists()] if not overwrite else []
    todo = [c for c in cases if c not in done]
    written = []
    for case in tqdm(todo, desc="predict", unit="case", disable=not progress or not todo, dynamic_ncols=True):
        probs = run.probabilities(case, fn=fn)
        mask = segment(probs)
        if uncertainty:
            _, spread = run.uncertainty(case, samples=samples or run.cfg["diffusion"]["ensemble"],
                                        noise_seed=noise_seed)
            written.append(write_array(spread, case, out_dir, "_uncertainty", overwrite=True))
        if save_probabilities:
            for k in range(1, num_classes):
                suffix = "_probability" if num_classes == 2 else f"_probability_{k}"
                written.append(write_array(probs[k], case, out_dir, suffix, overwrite=True))
        if preview:
            written.append(write_preview(case, mask, out_dir / f"{case.id}_preview.png"))
        written.append(write_mask(mask, case, out_dir, overwrite=True, num_classes=num_classes))  # last: "done"
    skipped = f", {len(done)} skipped (their masks exist already in {out_dir}; --overwrite redoes them)" \
        if done else ""
    log(f"predict: {len(todo)} case(s) segmented{skipped}; outputs in {out_dir}")
    return written


def draw_overlay(ax, image: np.ndarray, outlines: list[tuple[np.ndarray, str]], *,
                 window: tuple[float, float] | None = None) -> None:
    """A 2D image in grey (its 0.5-99.5 percentile window unless given) with each (mask, colour) outlined: the one
    picture of a segmentation that predict's previews and the HTML report both draw."""
    lo, hi = window if window is not None else np.percentile(image, [0.5, 99.5])
    ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
    for mask, colour in outlines:
        if mask.any():
            ax.contour(mask.T.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
    ax.set_axis_off()


def write_preview(case: Case, mask: np.ndarray, path: Path) -> Path:
    """A PNG of the image (first channel) with the mask's outline: 2D as is, 3D as the middle slice of each axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = case.image[0]
    views = [(image, mask)] if image.ndim == 2 else \
        [(np.take(image, image.shape[a] // 2, axis=a), np.take(mask, mask.shape[a] // 2, axis=a)) for a in range(3)]
    fig = Figure(figsize=(3.2 * len(views), 3.4))
    FigureCanvasAgg(fig)
    window = tuple(np.percentile(image, [0.5, 99.5]))
    for i, (img, lab) in enumerate(views):
        draw_overlay(fig.add_subplot(1, len(views), i + 1), img,
                     [(lab == k, f"C{(int(k) - 1) % 10}") for k in np.unique(lab)[1:]], window=window)
    fig.suptitle(f"{case.id}: {'mask outline' if image.ndim == 2 else 'middle slices, mask outline'}", fontsize=9)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
    return path
