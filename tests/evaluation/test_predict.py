"""LoadedRun and predict's helpers: refused inputs, threads, stale temp files and the preview's slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_2D

from superdiffusion.config import load_config
from superdiffusion.data.case import Case
from superdiffusion.engine.run import train_run
from superdiffusion.errors import InputError
from superdiffusion.evaluation.evaluate import (
    clean_stale_temp_files,
    predict_extra,
    preview_figure,
    preview_views,
    write_preview,
)
from superdiffusion.evaluation.predict import load_run, use_threads


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    train_run(load_config(None, [*TINY_2D, "train.steps=2", "train.val_every=0"]), out, progress=False)
    return out


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_predict_refuses_non_finite_arrays(run_dir, bad):
    run = load_run(run_dir)
    image = np.zeros((32, 32), np.float32)
    assert run.predict(image).shape == (32, 32)
    image[3, 4] = bad
    with pytest.raises(InputError, match="NaN or Inf") as exc:
        run.predict(image)
    assert "1 voxel" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(InputError, match="NaN or Inf"):
        run.predict(image, probabilities=True)


def test_use_threads_follows_the_argument_then_the_runs_config():
    torch.set_num_threads(2)
    assert use_threads({"train": {"threads": None}}) is None and torch.get_num_threads() == 2  # torch's own
    assert use_threads({"train": {"threads": 1}}) == 1 and torch.get_num_threads() == 1
    assert use_threads({"train": {"threads": 1}}, 2) == 2 and torch.get_num_threads() == 2
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InputError, match="--threads"):
            use_threads({"train": {"threads": None}}, bad)


def test_only_dead_writers_temp_files_are_cleaned(tmp_path):
    dead = tmp_path / f".tmp-{2 ** 22 + 1}-case.nii.gz"  # above Linux's largest pid: no such process
    live = tmp_path / ".tmp-1-case.nii.gz"  # pid 1 always runs
    others = [tmp_path / "case.nii.gz", tmp_path / ".tmp-notapid-case.nii.gz", tmp_path / ".hidden"]
    for p in (dead, live, *others):
        p.write_bytes(b"x")
    clean_stale_temp_files(tmp_path)
    assert not dead.exists() and live.exists() and all(p.exists() for p in others)


def test_predict_extras_are_known_by_their_base_id():
    files = {"a": Path("a.nii.gz"), "a_b": Path("a_b.nii.gz")}
    for name in ("a_probability", "a_probability_2", "a_uncertainty", "a_preview", "a_b_preview"):
        assert predict_extra(name, files), name
    for name in ("c_probability", "a_probabilities", "a_prev", "a"):
        assert not predict_extra(name, files), name


def test_preview_slices_cross_the_mask_in_the_cases_spacing():
    image = np.random.default_rng(0).normal(size=(20, 16, 10)).astype(np.float32)
    mask = np.zeros(image.shape, np.int64)
    mask[2:5, 11:14, 7:9] = 1  # far from the middle slices along every axis
    mask[3, 12, 8] = 1
    views = preview_views(image, mask, (1.0, 1.0, 2.5))
    assert [v[1].any() for v in views] == [True, True, True]  # the middle slices would all miss it
    assert [v[0].shape for v in views] == [(16, 10), (20, 10), (20, 16)]
    assert [v[2] for v in views] == [2.5, 2.5, 1.0]  # pixel height / width from the spacing
    empty = preview_views(image, np.zeros_like(mask), (1.0, 1.0, 2.5))
    assert all(np.array_equal(v[0], np.take(image, image.shape[a] // 2, axis=a)) for a, v in enumerate(empty))
    flat = preview_views(image[:, :, 0], mask[:, :, 8], (0.5, 2.0))
    assert len(flat) == 1 and flat[0][2] == 4.0


def test_preview_of_an_anisotropic_volume_is_drawn_in_its_spacing(tmp_path):
    from PIL import Image

    image = np.random.default_rng(0).normal(size=(1, 32, 32, 8)).astype(np.float32)
    mask = np.zeros((32, 32, 8), np.int64)
    mask[8:24, 8:24, 2:6] = 1
    case = Case("c", image, None, (1.0, 1.0, 4.0), "c.nii.gz")
    assert [ax.get_aspect() for ax in preview_figure(case, mask).axes] == [4.0, 4.0, 1.0]  # not squashed 4x
    path = write_preview(case, mask, tmp_path / "c_preview.png")
    assert np.asarray(Image.open(path)).std() > 0 and not list(tmp_path.glob(".tmp-*"))


def test_preview_of_a_colour_picture_is_the_photo_with_the_outline(tmp_path):
    """A dermoscopy-like RGB picture: drawn as the photograph (rows down, in colour) with the lesion's outline, as a
    dermatologist reads it; the mask written for a .bmp input is a 0/255 BMP at the image's own size."""
    from PIL import Image

    from superdiffusion.data.readers import mask_path, write_mask

    h, w = 40, 56
    rgb = np.zeros((3, h, w), np.float32)
    rgb[0], rgb[1], rgb[2] = 0.9, 0.6, 0.5  # skin
    yy, xx = np.mgrid[:h, :w]
    lesion = ((yy - 12) ** 2 + (xx - 40) ** 2 < 64).astype(np.int64)  # top right, off-centre
    rgb[:, lesion == 1] = [[0.3], [0.15], [0.1]]
    case = Case("IMD001", rgb, None, (1.0, 1.0), str(tmp_path / "IMD001.bmp"), meta={"suffix": ".bmp"})
    fig = preview_figure(case, lesion)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (h, w, 3)  # colour, rows down: not transposed
    assert ax.images[0].origin == "upper" and ax.collections  # the outline is drawn
    path = write_preview(case, lesion, tmp_path / "IMD001_preview.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).any()  # in colour, not grey
    out = write_mask(lesion, case, tmp_path, overwrite=True, num_classes=2)
    assert out == mask_path(case, tmp_path) and out.suffix == ".bmp"
    saved = np.asarray(Image.open(out))
    assert saved.shape == (h, w) and set(np.unique(saved)) == {0, 255}
