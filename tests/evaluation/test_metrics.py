"""Metrics must equal medpy.metric.binary (the literature's numbers) and never crash on empty masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.ndimage import gaussian_filter

from superdiffusion.errors import InputError
from superdiffusion.evaluation import metrics as M


def blob(shape: tuple[int, ...], seed: int, thr: float = 0.6, sigma: float = 2.0) -> np.ndarray:
    """Thresholded smoothed noise: irregular, multi-component masks like real segmentations."""
    x = gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return x > np.quantile(x, thr)


def medpy_all(pred, gt, spacing):
    mb = pytest.importorskip("medpy.metric.binary")
    return {
        "dice": mb.dc(pred, gt),
        "jaccard": mb.jc(pred, gt),
        "hd95": mb.hd95(pred, gt, voxelspacing=spacing),
        "asd": mb.asd(pred, gt, voxelspacing=spacing),
    }


def ours_all(pred, gt, spacing):
    return {
        "dice": M.dice(pred, gt),
        "jaccard": M.jaccard(pred, gt),
        "hd95": M.hd95(pred, gt, spacing),
        "asd": M.asd(pred, gt, spacing),
    }


CASES = [
    ((64, 56), None),
    ((64, 56), (0.7, 1.3)),
    ((40, 36, 20), None),
    ((40, 36, 20), (0.625, 0.625, 2.5)),
    ((40, 36, 20), 0.8),
]


@pytest.mark.parametrize("shape,spacing", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_medpy_on_blobs(shape, spacing, seed):
    pred, gt = blob(shape, seed), blob(shape, seed + 100, thr=0.55)
    ref, got = medpy_all(pred, gt, spacing), ours_all(pred, gt, spacing)
    for k in M.METRICS:
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k
        assert isinstance(got[k], float)


def test_matches_medpy_on_overlapping_perturbed_blob():
    """A realistic prediction: the gt, slightly dilated/eroded in places."""
    gt = blob((48, 40, 24), 7, thr=0.7, sigma=3.0)
    pred = gt ^ (blob((48, 40, 24), 8, thr=0.9, sigma=1.0) & (gaussian_filter(gt * 1.0, 1) > 0.2))
    sp = (0.625, 0.625, 2.5)
    ref, got = medpy_all(pred, gt, sp), ours_all(pred, gt, sp)
    for k in M.METRICS:
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k


@st.composite
def mask_pairs(draw):
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    masks = [draw(arrays(np.bool_, shape)) for _ in range(2)]
    for m in masks:  # non-empty: medpy raises on empty masks
        m[tuple(draw(st.integers(0, s - 1)) for s in shape)] = True
    spacing = draw(st.none() | st.tuples(*[st.sampled_from([0.5, 1.0, 2.5, 0.625]) for _ in shape]))
    return masks[0], masks[1], spacing


@settings(max_examples=80, deadline=None)
@given(mask_pairs())
def test_property_matches_medpy(pair):
    pred, gt, spacing = pair
    ref, got = medpy_all(pred, gt, spacing), ours_all(pred, gt, spacing)
    for k in M.METRICS:
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k


@pytest.mark.parametrize(
    "shape,spacing,touch_edge",
    [((60, 50), (0.7, 1.3), False), ((30, 28, 16), (0.625, 0.625, 2.5), False), ((30, 28, 16), None, True)],
)
def test_cropping_is_identical_to_uncropped(shape, spacing, touch_edge):
    pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
    inner = tuple(slice(s // 4, 3 * s // 4) for s in shape)
    pred[inner] = blob(shape, 3, thr=0.4)[inner]
    gt[inner] = blob(shape, 4, thr=0.4)[inner]
    if touch_edge:  # objects on the image edge: the margin is clipped there, erosion must not change
        pred[0] = True
        gt[..., -1] = True
    sp = M._spacing(spacing, len(shape))
    box = M._crop_box(pred, gt)
    if not touch_edge:
        assert all(b.stop - b.start < s for b, s in zip(box, shape))  # it really crops
    cropped, full = (
        M._surface_distances(pred, gt, sp, crop=True),
        M._surface_distances(pred, gt, sp, crop=False),
    )
    for c, f in zip(cropped, full):
        np.testing.assert_array_equal(c, f)


def test_empty_mask_policy():
    shape, sp = (10, 20, 5), (0.5, 0.5, 2.0)
    diag = math.sqrt(5.0**2 + 10.0**2 + 10.0**2)
    empty, full = np.zeros(shape, bool), np.zeros(shape, bool)
    full[3:6, 4:9, 1:3] = True
    assert ours_all(empty, empty, sp) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    for pred, gt in [(empty, full), (full, empty)]:
        got = ours_all(pred, gt, sp)
        assert got["dice"] == got["jaccard"] == 0.0
        assert got["hd95"] == pytest.approx(diag) and got["asd"] == pytest.approx(diag)
    assert M.hd95(empty, full) == pytest.approx(math.sqrt(100 + 400 + 25))  # unit spacing
    assert M.case_metrics(np.zeros((4, 4), int), np.zeros((4, 4), int))["hd95"] == 0.0


def test_case_metrics_binary_uses_class_1():
    gt = blob((32, 30, 12), 11).astype(np.int64)
    pred = blob((32, 30, 12), 12).astype(np.int64)
    sp = (0.625, 0.625, 2.5)
    out = M.case_metrics(pred, gt, spacing=sp)
    assert set(out) == set(M.METRICS)
    assert out == ours_all(pred == 1, gt == 1, sp)
    assert all(type(v) is float for v in out.values())


def test_case_metrics_multiclass_averages_foreground():
    shape = (40, 36)
    gt = blob(shape, 20).astype(np.int64) + blob(shape, 21).astype(np.int64) * 2
    gt[gt > 2] = 2
    pred = blob(shape, 22).astype(np.int64) + blob(shape, 23).astype(np.int64) * 2
    pred[pred > 2] = 2
    out = M.case_metrics(pred, gt, num_classes=4, spacing=(0.5, 1.0))  # class 3 absent in both
    assert set(out["per_class"]) == {"1", "2", "3"}
    for c in (1, 2):
        assert out["per_class"][str(c)] == ours_all(pred == c, gt == c, (0.5, 1.0))
    assert out["per_class"]["3"] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    for k in M.METRICS:
        assert out[k] == pytest.approx(np.mean([out["per_class"][c][k] for c in "123"]))
        assert type(out[k]) is float


def test_shape_mismatch_and_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match=r"\(4, 5\).*\(4, 6\)") as e:
        M.case_metrics(np.zeros((4, 5), int), np.zeros((4, 6), int))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError):
        M.dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(InputError):
        M.hd95(np.ones((3, 3)), np.ones((3, 3)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError):
        M.case_metrics(np.zeros((2, 2, 2, 2), int), np.zeros((2, 2, 2, 2), int))


def test_summarize_mean_and_population_std():
    per_case = {
        "a": {"dice": 0.8, "jaccard": 0.6, "hd95": 2.0, "asd": 1.0},
        "b": {"dice": 0.6, "jaccard": 0.4, "hd95": 4.0, "asd": 3.0, "per_class": {}},
    }
    s = M.summarize(per_case)
    assert s["n_cases"] == 2
    assert s["dice"]["mean"] == pytest.approx(0.7) and s["dice"]["std"] == pytest.approx(0.1)
    assert s["hd95"] == {"mean": 3.0, "std": 1.0}
    assert s["asd"]["std"] == pytest.approx(1.0)
    empty = M.summarize({})
    assert empty["n_cases"] == 0 and math.isnan(empty["dice"]["mean"])


def test_la_sized_volume():
    """An LA-like volume (~200x150x88) with ellipsoids (timing lives in benchmarks, not here)."""
    zz, yy, xx = np.ogrid[:200, :150, :88]
    gt = ((zz - 100) / 45.0) ** 2 + ((yy - 75) / 35.0) ** 2 + ((xx - 44) / 22.0) ** 2 <= 1
    pred = ((zz - 104) / 43.0) ** 2 + ((yy - 73) / 36.0) ** 2 + ((xx - 45) / 21.0) ** 2 <= 1
    out = M.case_metrics(pred.astype(np.int64), gt.astype(np.int64), spacing=(0.625, 0.625, 0.625))
    assert 0.8 < out["dice"] < 1.0 and out["hd95"] > 0
