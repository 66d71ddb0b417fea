"""Segmentation metrics that reproduce `medpy.metric.binary` (dc, jc, hd95, asd) exactly.

The semi-supervised LA literature reports medpy's numbers, so these are re-implemented with numpy/scipy
to the same definitions (medpy is only a test dependency):

* surface = mask XOR binary_erosion(mask, generate_binary_structure(ndim, 1)) (connectivity 1, scipy's
  default border_value=0, so voxels on the image edge count as surface);
* surface distances pred -> gt = distance_transform_edt(~gt_surface, sampling=spacing) at pred's surface;
* `hd95` = 95th percentile of both directions pooled; `asd` = mean of pred -> gt only (medpy's `asd`,
  not the symmetric `assd`).

Distances are computed on the union bounding box plus a 1-voxel margin, which gives identical values
(every surface voxel is inside the box, and the margin keeps erosion at the box edge as it was) and makes
LA-sized volumes fast.

Empty-mask policy (medpy raises there; here nothing crashes and means stay defined):

* both empty: dice = jaccard = 1, hd95 = asd = 0 (a correct "nothing there");
* exactly one empty: dice = jaccard = 0, hd95 = asd = the diagonal of the image extent,
  sqrt(sum((shape_i * spacing_i)**2)), in the spacing's units: no two voxels of the image are further
  apart, so it is a finite worst-case penalty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from superdiffusion.errors import InputError

METRICS = ("dice", "jaccard", "hd95", "asd")
Spacing = float | Sequence[float] | None


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binarise like medpy (nonzero = object) and refuse mismatched shapes."""
    pred, gt = np.atleast_1d(np.asarray(pred).astype(bool)), np.atleast_1d(np.asarray(gt).astype(bool))
    if pred.shape != gt.shape:
        raise InputError(f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}")
    return pred, gt


def _spacing(spacing: Spacing, ndim: int) -> np.ndarray:
    """Spacing as float64 per axis; a scalar applies to all axes (as medpy/scipy do)."""
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim:
        raise InputError(f"spacing {tuple(sp.tolist())} has {sp.size} values for a {ndim}D image")
    return sp


def _empty_penalty(shape: tuple[int, ...], sp: np.ndarray) -> float:
    """Diagonal of the image extent: an upper bound of any distance in the image."""
    return float(np.sqrt(np.sum((np.asarray(shape) * sp) ** 2)))


def _crop_box(*masks: np.ndarray) -> tuple[slice, ...]:
    """Union bounding box plus a 1-voxel margin (clipped to the image)."""
    union = np.logical_or.reduce(masks)
    box = []
    for ax in range(union.ndim):
        hit = np.flatnonzero(np.any(union, axis=tuple(a for a in range(union.ndim) if a != ax)))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, union.shape[ax])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask ^ binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), iterations=1)


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, sp: np.ndarray, crop: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(pred -> gt, gt -> pred) surface distances of two non-empty boolean masks, as medpy computes them."""
    if crop:
        box = _crop_box(pred, gt)
        pred, gt = pred[box], gt[box]
    pb, gb = _surface(pred), _surface(gt)
    d_pg = distance_transform_edt(~gb, sampling=sp)[pb]
    d_gp = distance_transform_edt(~pb, sampling=sp)[gb]
    return d_pg, d_gp


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient (medpy `dc`); 1 when both masks are empty."""
    pred, gt = _pair(pred, gt)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    return 1.0 if total == 0 else float(2.0 * np.count_nonzero(pred & gt) / total)


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index (medpy `jc`); 1 when both masks are empty."""
    pred, gt = _pair(pred, gt)
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else float(np.count_nonzero(pred & gt)) / float(union)


def _distance_metric(pred: np.ndarray, gt: np.ndarray, spacing: Spacing, which: str) -> float:
    pred, gt = _pair(pred, gt)
    sp = _spacing(spacing, pred.ndim)
    n_pred, n_gt = pred.any(), gt.any()
    if not n_pred and not n_gt:
        return 0.0
    if not (n_pred and n_gt):
        return _empty_penalty(pred.shape, sp)
    d_pg, d_gp = _surface_distances(pred, gt, sp)
    if which == "asd":
        return float(d_pg.mean())
    return float(np.percentile(np.hstack((d_pg, d_gp)), 95))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = None) -> float:
    """95th percentile of pooled symmetric surface distances (medpy `hd95`, connectivity 1)."""
    return _distance_metric(pred, gt, spacing, "hd95")


def asd(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = None) -> float:
    """Mean surface distance from pred to gt, one direction (medpy `asd`, connectivity 1)."""
    return _distance_metric(pred, gt, spacing, "asd")


def _binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> dict[str, float]:
    return {
        "dice": dice(pred, gt),
        "jaccard": jaccard(pred, gt),
        "hd95": hd95(pred, gt, spacing),
        "asd": asd(pred, gt, spacing),
    }


def case_metrics(pred: np.ndarray, gt: np.ndarray, *, num_classes: int = 2, spacing: Spacing = None) -> dict:
    """Metrics of one case from integer label maps (*spatial), 2D or 3D.

    Binary: the four metrics of class 1. K > 2: their mean over classes 1..K-1, plus "per_class".
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise InputError(f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}")
    if pred.ndim not in (2, 3):
        raise InputError(f"label maps must be 2D or 3D (*spatial), got shape {pred.shape}")
    if num_classes < 2:
        raise InputError(f"num_classes must be >= 2, got {num_classes}")
    per_class = {str(c): _binary_metrics(pred == c, gt == c, spacing) for c in range(1, num_classes)}
    if num_classes == 2:
        return per_class["1"]
    out: dict = {m: float(np.mean([v[m] for v in per_class.values()])) for m in METRICS}
    out["per_class"] = per_class
    return out


def summarize(per_case: Mapping[str, Mapping]) -> dict:
    """Mean and population std (ddof=0) of each metric over cases; NaN for no cases."""
    out: dict = {}
    for m in METRICS:
        vals = np.asarray([float(c[m]) for c in per_case.values()], dtype=np.float64)
        out[m] = (
            {"mean": float(vals.mean()), "std": float(vals.std())}
            if vals.size
            else {"mean": float("nan"), "std": float("nan")}
        )
    out["n_cases"] = len(per_case)
    return out
