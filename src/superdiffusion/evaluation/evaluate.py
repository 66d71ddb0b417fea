"""`evaluate` and `predict`: a run on a labelled dataset, mask folders against mask folders, masks to disk."""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.case import Case
from ..data.pipeline import SUFFIX_FORMATS, file_suffix, input_refs, load_cases, require_labels
from ..data.readers import (
    array_path,
    geometry_mismatch,
    load_case,
    mask_path,
    read_geometry,
    read_mask,
    write_array,
    write_mask,
)
from ..errors import InputError, check_positive_int
from ..outputs import check_output_dir
from .inference import segment
from .metrics import METRICS, case_metrics, summarize
from .predict import load_run, use_threads


def report(per_case: dict[str, dict], **info) -> dict:
    s = summarize(per_case)
    return {**info, "n_cases": len(per_case), "mean": {k: s[k]["mean"] for k in METRICS},
            "std": {k: s[k]["std"] for k in METRICS}, "per_case": per_case}


def evaluate_run(run_dir, data_root, list_file=None, *, fmt=None, checkpoint=None, predictor=None,
                 threads: int | None = None) -> dict:
    """Predict every case of a labelled dataset with the run and score it (threads: as predict_files)."""
    run = load_run(run_dir, checkpoint=checkpoint, predictor=predictor)
    use_threads(run.cfg, threads)
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
        if p.is_file() and file_suffix(p) in SUFFIX_FORMATS and not p.name.startswith("."):  # no temp files
            files[p.name[: -len(file_suffix(p))]] = p
    if not files:
        raise InputError(f"{folder}: no mask files found")
    return files


PREDICT_EXTRAS = re.compile(r"^(.+)_(probability(_\d+)?|uncertainty|preview)$")


def predict_extra(name: str, files: dict[str, Path]) -> bool:
    """Whether `name` is one of predict's extras (`<id>_probability[_k]`, `_uncertainty`, `_preview`) of a mask
    `<id>` in the same folder: not a prediction, so neither scored nor warned about."""
    m = PREDICT_EXTRAS.match(name)
    return bool(m) and m.group(1) in files


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
    extra = sorted(k for k in set(pred) - set(gt) if not predict_extra(k, pred))
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


STAMP = ".superdiffusion-predict.json"  # what made the masks of a predict folder
_TEMP = re.compile(r"^\.tmp-(\d+)-.")  # the temporary files of predict's writers: .tmp-<pid>-<name>


def predict_stamp(run, run_dir, *, mode, ddim_steps, samples, noise_seed, uncertainty: bool) -> dict:
    """The settings that decide a predict folder's outputs, defaults resolved (so `--samples 5` and its default 5
    agree); keys that cannot change the outputs are left out."""
    dc = run.cfg["diffusion"]
    teacher = run.predictor == "teacher" or bool(mode)
    mode = mode or (dc["inference"] if teacher else None)
    stamp = {"run": str(Path(run_dir).resolve()), "checkpoint": run.checkpoint.name, "predictor": run.predictor,
             "mode": mode}
    if mode == "ddim":
        stamp["ddim_steps"] = ddim_steps or dc["ddim_steps"]
    if mode == "ensemble" or uncertainty:
        stamp["samples"] = samples or dc["ensemble"]
    if teacher or uncertainty:
        stamp["noise_seed"] = dc["noise_seed"] if noise_seed is None else noise_seed
    return stamp


def check_stamp(out_dir: Path, stamp: dict, masks: list[Path]) -> dict:
    """The folder's stamp merged with `stamp`, or a one-line error when its outputs were made otherwise (another
    run, checkpoint, predictor or mode), or by something other than predict (masks there but no stamp)."""
    old = read_stamp(out_dir)
    if old is None:
        if masks:
            raise InputError(f"{out_dir}: holds masks (e.g. {masks[0].name}) not made by superdiffusion predict "
                             f"(no readable {STAMP}); pass --overwrite to replace them, or choose another --out")
        return stamp
    for key in stamp.keys() & old.keys():
        if stamp[key] != old[key]:
            raise InputError(f"{out_dir}: holds outputs made with {key} {old[key]!r}, not {stamp[key]!r}; pass "
                             "--overwrite to replace them, or choose another --out")
    return {**old, **stamp}


def read_stamp(out_dir: Path) -> dict | None:
    try:
        old = json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def clean_stale_temp_files(out_dir: Path) -> None:
    """Remove the temporary files (.tmp-<pid>-...) that a killed predict left; those of live processes stay."""
    for p in out_dir.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def predict_files(run_dir, inputs, out_dir, *, checkpoint=None, predictor=None, mode=None, ddim_steps=None,
                  samples=None, noise_seed=None, uncertainty: bool = False, save_probabilities: bool = False,
                  preview: bool = False, overwrite: bool = False, progress: bool = True, threads: int | None = None,
                  log=print) -> list[Path]:
    """Segment each input and write its mask (and optional extras) in the input's own format.

    predictor: student | teacher (default: the run's choice on validation); mode: the teacher's
    inference (fixed, ddim, ensemble). uncertainty: the std of `samples` teacher passes, as a float map.
    save_probabilities: the foreground probability (`<id>_probability`; `_probability_<k>` per foreground class
    for more classes) as float maps. preview: `<id>_preview.png`, the image with the mask's outline (for a volume,
    the slice through the mask's largest cross-section along each axis). threads: torch's CPU threads (default
    the run's train.threads). A case whose requested outputs all exist already in `out_dir` is skipped, and one
    missing some extras gets them, so an interrupted predict continues into the same folder (the mask is written
    last, atomically); the folder's stamp (STAMP) records the run and settings, and a different run or setting
    is refused. `overwrite` redoes every case.
    """
    check_positive_int("--samples", samples)
    check_positive_int("--ddim-steps", ddim_steps)
    out_dir = check_output_dir(out_dir)
    run = load_run(run_dir, checkpoint=checkpoint, predictor=predictor)
    use_threads(run.cfg, threads)
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
    samples = samples or run.cfg["diffusion"]["ensemble"]
    fn = run.teacher(mode, steps=ddim_steps, samples=samples, noise_seed=noise_seed) if mode else None
    stamp = predict_stamp(run, run_dir, mode=mode, ddim_steps=ddim_steps, samples=samples, noise_seed=noise_seed,
                          uncertainty=uncertainty)
    if not overwrite and out_dir.is_dir():
        stamp = check_stamp(out_dir, stamp, [p for c in cases if (p := mask_path(c, out_dir)).exists()])
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(out_dir)
    if read_stamp(out_dir) != stamp:
        tmp = out_dir / f".tmp-{os.getpid()}-{STAMP}"
        tmp.write_text(json.dumps(stamp, indent=1) + "\n")
        os.replace(tmp, out_dir / STAMP)  # before the first output: an interrupted folder is stamped too

    extras = {"_uncertainty": None} if uncertainty else {}  # suffix -> the class whose probability it holds
    if save_probabilities:
        extras |= {"_probability" if num_classes == 2 else f"_probability_{k}": k for k in range(1, num_classes)}

    def outputs(case: Case) -> dict[str, Path]:
        paths = {suffix: array_path(case, out_dir, suffix) for suffix in extras}
        if preview:
            paths["preview"] = out_dir / f"{case.id}_preview.png"
        return {**paths, "mask": mask_path(case, out_dir)}  # the mask last: it marks the case done

    todo = {c.id: [k for k, p in outputs(c).items() if overwrite or not p.exists()] for c in cases}
    todo = {k: v for k, v in todo.items() if v}
    written = []
    for case in tqdm([c for c in cases if c.id in todo], desc="predict", unit="case",
                     disable=not progress or not todo, dynamic_ncols=True):
        wanted = todo[case.id]
        if wanted != ["_uncertainty"]:
            probs = run.probabilities(case, fn=fn)
            mask = segment(probs)
        for key in wanted:
            if key == "_uncertainty":
                _, spread = run.uncertainty(case, samples=samples, noise_seed=noise_seed)
                written.append(write_array(spread, case, out_dir, key, overwrite=True))
            elif key in extras:
                written.append(write_array(probs[extras[key]], case, out_dir, key, overwrite=True))
            elif key == "preview":
                written.append(write_preview(case, mask, outputs(case)[key]))
            else:
                written.append(write_mask(mask, case, out_dir, overwrite=True, num_classes=num_classes))
    segmented = sum("mask" in v for v in todo.values())
    completed = f", extras added for {len(todo) - segmented} whose mask existed" if len(todo) > segmented else ""
    skipped = len(cases) - len(todo)
    skipped = f", {skipped} skipped (their outputs exist already in {out_dir}; --overwrite redoes them)" \
        if skipped else ""
    log(f"predict: {segmented} case(s) segmented{completed}{skipped}; outputs in {out_dir}")
    return written


def draw_overlay(ax, image: np.ndarray, outlines: list[tuple[np.ndarray, str]], *,
                 window: tuple[float, float] | None = None, aspect: float = 1.0, photo: bool = False) -> None:
    """A 2D image in grey (its 0.5-99.5 percentile window unless given) with each (mask, colour) outlined: the one
    picture of a segmentation that predict's previews and the HTML report both draw. aspect: a pixel's height over
    its width (the spacing of the image's second axis over its first's), so anisotropic voxels look as in space.
    photo: a 2D picture as stored, (H, W) or RGB (3, H, W), drawn as a photograph (rows down, in colour)."""
    if photo:
        picture = np.moveaxis(image, 0, -1) if image.ndim == 3 else image
        lo, hi = window if window is not None else np.percentile(picture, [0.5, 99.5])
        ax.imshow(np.clip((picture - lo) / max(hi - lo, 1e-8), 0, 1), cmap=None if picture.ndim == 3 else "gray",
                  interpolation="nearest", aspect=aspect)
    else:
        lo, hi = window if window is not None else np.percentile(image, [0.5, 99.5])
        ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest", aspect=aspect)
    for mask, colour in outlines:
        if mask.any():
            ax.contour((mask if photo else mask.T).astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
    ax.set_axis_off()


def preview_views(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...]
                  ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(image, mask, aspect) of each picture of a preview: a 2D image as it is; a volume, along each axis, the slice
    with the most foreground (the middle slice of an empty mask), so that the outline is seen wherever it lies."""
    if image.ndim == 2:
        return [(image, mask, float(spacing[1]) / float(spacing[0]))]
    views = []
    for axis, k in largest_sections(mask):
        rest = [d for d in range(3) if d != axis]
        views.append((np.take(image, k, axis=axis), np.take(mask, k, axis=axis),
                      float(spacing[rest[1]]) / float(spacing[rest[0]])))
    return views


def largest_sections(mask: np.ndarray) -> list[tuple[int, int]]:
    """(axis, index) of a volume's slice with the most foreground along each axis (the middle one where empty)."""
    out = []
    for axis in range(3):
        area = (mask > 0).sum(axis=tuple(d for d in range(3) if d != axis))
        out.append((axis, int(area.argmax()) if area.any() else mask.shape[axis] // 2))
    return out


def write_preview(case: Case, mask: np.ndarray, path: Path) -> Path:
    """A PNG of the image with the mask's outline: a 2D picture as a photograph (RGB in colour), a volume's first
    channel as the slice through the mask's largest cross-section along each axis, in the case's spacing."""
    fig = preview_figure(case, mask)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def preview_figure(case: Case, mask: np.ndarray):
    """The matplotlib Figure that write_preview saves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    photo = case.spatial_dims == 2  # a picture (grey or colour), drawn as one: rows down, RGB in colour
    image = case.image if photo and len(case.image) == 3 else case.image[0]
    views = [(image, mask, float(case.spacing[0]) / float(case.spacing[1]))] if photo else \
        preview_views(image, mask, case.spacing)
    fig = Figure(figsize=(3.2 * len(views), 3.4))
    FigureCanvasAgg(fig)
    window = tuple(np.percentile(image, [0.5, 99.5]))
    for i, (img, lab, aspect) in enumerate(views):
        draw_overlay(fig.add_subplot(1, len(views), i + 1), img,
                     [(lab == k, f"C{(int(k) - 1) % 10}") for k in np.unique(lab)[1:]], window=window, aspect=aspect,
                     photo=photo)
    title = "mask outline" if image.ndim == 2 else "slices through the mask, outline"
    fig.suptitle(f"{case.id}: {title}", fontsize=9)
    return fig
