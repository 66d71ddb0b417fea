"""Whole-case inference: probabilities (K, *original spatial) summing to 1, for 2D cases, 3D cases through
a 2D net (slices), 3D nets with a sliding window, and resampled (data.scale) inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from superdiffusion.config import load_config
from superdiffusion.data.case import Case
from superdiffusion.data.pipeline import prepare_image
from superdiffusion.data.synthetic import make_synthetic_case
from superdiffusion.evaluation.inference import evaluate_cases, predict_labels, predict_probabilities, segment
from superdiffusion.methods import build_method


def _data_cfg(*overrides: str) -> dict:
    return load_config(None, list(overrides))["data"]


class Pointwise:
    """logits = [-x, x] per pixel (foreground probability sigmoid(2x)); records the shapes it sees."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return torch.cat([-x[:, :1], x[:, :1]], dim=1)


def _expected_fg(case: Case, data_cfg: dict) -> np.ndarray:
    return torch.sigmoid(2 * torch.from_numpy(prepare_image(case.image, data_cfg)[0])).numpy()


def _check_probabilities(probs: np.ndarray, k: int, shape: tuple[int, ...]) -> None:
    assert probs.shape == (k, *shape)
    assert probs.dtype == np.float32
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1 + 1e-6).all()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_2d_case():
    case = make_synthetic_case(0, dims=2, shape=(40, 36))
    data_cfg = _data_cfg()
    fn = Pointwise()
    probs = predict_probabilities(fn, case, data_cfg=data_cfg, dims=2, patch=[16, 16], overlap=0.5)
    _check_probabilities(probs, 2, (40, 36))
    np.testing.assert_allclose(probs[1], _expected_fg(case, data_cfg), atol=1e-5)
    assert all(s[2:] == (16, 16) for s in fn.shapes)  # sliding windows of the patch size


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_3d_case_through_a_2d_net(slice_axis):
    shape = (10, 12, 8)
    case = make_synthetic_case(1, dims=3, shape=shape)
    data_cfg = _data_cfg(f"data.slice_axis={slice_axis}")
    fn = Pointwise()
    plane = tuple(s for i, s in enumerate(shape) if i != slice_axis)
    probs = predict_probabilities(fn, case, data_cfg=data_cfg, dims=2, patch=list(plane))
    _check_probabilities(probs, 2, shape)
    # every voxel lands back where it came from, whichever axis was sliced
    np.testing.assert_allclose(probs[1], _expected_fg(case, data_cfg), atol=1e-5)
    assert all(len(s) == 4 and s[2:] == plane for s in fn.shapes)  # 2D batches of slices
    assert sum(s[0] for s in fn.shapes) == shape[slice_axis]


def test_3d_net_sliding_window_on_a_larger_volume():
    shape = (24, 20, 18)
    case = make_synthetic_case(2, dims=3, shape=shape)
    data_cfg = _data_cfg()
    fn = Pointwise()
    probs = predict_probabilities(fn, case, data_cfg=data_cfg, dims=3, patch=[16, 16, 16], overlap=0.5,
                                  sw_batch_size=2)
    _check_probabilities(probs, 2, shape)
    np.testing.assert_allclose(probs[1], _expected_fg(case, data_cfg), atol=1e-5)
    assert len(fn.shapes) > 1 and all(s[2:] == (16, 16, 16) and s[0] <= 2 for s in fn.shapes)


def test_3d_unet_sliding_window_and_three_classes():
    cfg = load_config(None, ["data.dims=3", "data.num_classes=3", "model.channels=[4, 8]"])
    method = build_method(cfg, in_channels=1).eval()
    case = make_synthetic_case(3, dims=3, shape=(20, 18, 16))
    probs = predict_probabilities(method.predictors()["student"], case, data_cfg=cfg["data"], dims=3,
                                  patch=[16, 16, 16])
    _check_probabilities(probs, 3, (20, 18, 16))
    assert set(np.unique(segment(probs))) <= {0, 1, 2}
    # labels computed where the windows ran (validation's path) are the argmax of the probabilities
    labels = predict_labels(method.predictors()["student"], case, data_cfg=cfg["data"], dims=3, patch=[16, 16, 16])
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, segment(probs))


@pytest.mark.parametrize(("dims", "shape", "scale", "net_shape"), [
    (2, (40, 36), [0.5, 0.5], (20, 18)),
    (2, (30, 30), [1.5, 1.5], (45, 45)),
    (3, (16, 20, 12), [0.5, 0.5, 1.0], (8, 10, 12)),
])
def test_scaled_input_returns_original_shape(dims, shape, scale, net_shape):
    grids = np.meshgrid(*[np.linspace(0, 2 * np.pi, s, dtype=np.float32) for s in shape], indexing="ij")
    smooth = np.prod([np.sin(g) for g in grids], axis=0)[None].astype(np.float32)  # survives resampling
    case = Case("smooth", smooth, None, (1.0,) * dims, "test", {})
    data_cfg = _data_cfg(f"data.scale={scale}")
    fn = Pointwise()
    patch = [8] * dims
    probs = predict_probabilities(fn, case, data_cfg=data_cfg, dims=dims, patch=patch)
    _check_probabilities(probs, 2, shape)
    assert prepare_image(case.image, data_cfg).shape[1:] == net_shape  # the net ran at the scaled grid
    # probabilities resampled back still follow the image: strongly correlated with the unscaled answer
    unscaled = _expected_fg(case, _data_cfg())
    assert np.corrcoef(probs[1].ravel(), unscaled.ravel())[0, 1] > 0.95


def test_scaled_3d_case_through_a_2d_net():
    case = make_synthetic_case(5, dims=3, shape=(16, 16, 10))
    data_cfg = _data_cfg("data.scale=[0.5, 0.5, 1.0]")
    fn = Pointwise()
    probs = predict_probabilities(fn, case, data_cfg=data_cfg, dims=2, patch=[8, 8])
    _check_probabilities(probs, 2, (16, 16, 10))
    assert sum(s[0] for s in fn.shapes) == 10 and all(s[2:] == (8, 8) for s in fn.shapes)


def test_evaluate_cases_scores_at_the_original_resolution():
    case = make_synthetic_case(6, dims=2, shape=(32, 32))
    data_cfg = _data_cfg()
    label = (prepare_image(case.image, data_cfg)[0] > 0).astype(np.int64)
    case = Case(case.id, case.image, label, case.spacing, case.source, case.meta)
    full = evaluate_cases(Pointwise(), [case], data_cfg=data_cfg, dims=2, patch=[16, 16])
    assert full[case.id]["dice"] == pytest.approx(1.0) and full[case.id]["hd95"] == pytest.approx(0.0)
    quick = evaluate_cases(Pointwise(), [case], data_cfg=data_cfg, dims=2, patch=[16, 16], full=False)
    assert quick == {case.id: {"dice": pytest.approx(1.0)}}


def test_one_padding_rule_when_the_patch_is_larger_than_the_image():
    """Training crops and inference pad alike (centred, with the prepared case's minimum): the network sees at
    inference exactly the padded image it was trained on."""
    from superdiffusion.data.pipeline import crop, pad_value

    case = make_synthetic_case(3, dims=2, shape=(20, 18))
    data_cfg = _data_cfg()
    image = prepare_image(case.image, data_cfg)
    seen = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return torch.cat([-x[:, :1], x[:, :1]], dim=1)

    probs = predict_probabilities(record, case, data_cfg=data_cfg, dims=2, patch=[32, 32])
    trained, _ = crop(image, None, (32, 32), np.random.default_rng(0))
    assert len(seen) == 1 and seen[0].shape == (1, 1, 32, 32)
    np.testing.assert_array_equal(seen[0][0].numpy(), trained)
    assert np.isclose(trained.min(), pad_value(image)) and (trained == pad_value(image)).sum() > 32 * 32 - 20 * 18
    assert probs.shape == (2, 20, 18)


def test_whole_slices_of_a_fixed_size_run_in_one_pass_and_come_back_at_the_original_grid():
    shape = (30, 26, 8)
    case = make_synthetic_case(2, dims=3, shape=shape)
    data_cfg = _data_cfg("data.size=[16, 16, null]")
    assert prepare_image(case.image, data_cfg).shape == (1, 16, 16, 8)
    fn = Pointwise()
    probs = predict_probabilities(fn, case, data_cfg=data_cfg, dims=2, patch=[16, 16])
    _check_probabilities(probs, 2, shape)
    assert fn.shapes == [(8, 1, 16, 16)]  # every slice whole, in one batch, no windows


@pytest.mark.parametrize("size,message", [([16, 16], "must list 3"), ([16, 0, None], "positive"),
                                          ([16, "a", None], "positive")])
def test_bad_data_size_is_one_line_naming_the_key(size, message):
    from superdiffusion.errors import InputError

    case = make_synthetic_case(2, dims=3, shape=(10, 10, 8))
    with pytest.raises(InputError, match=f"data.size.*{message}"):
        prepare_image(case.image, {**_data_cfg(), "size": size})
    with pytest.raises(InputError, match="data.scale, data.size and data.spacing"):
        prepare_image(case.image, {**_data_cfg(), "size": [8, 8, None], "scale": [0.5, 0.5, 1.0]})
