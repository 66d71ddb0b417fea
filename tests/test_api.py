"""The documented Python API (`import superdiffusion as sd`): train a config, load the run, predict an array or a
file, as the package docstring and docs/USAGE.md show it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_2D

import superdiffusion as sd
from superdiffusion.data.synthetic import make_synthetic_case
from superdiffusion.errors import InputError

TINY = ["method=supervised", *TINY_2D, "train.steps=4", "train.val_every=0", "train.ckpt_every=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    results = sd.train("demo", out, overrides=TINY, progress=False)
    assert results["steps"] == 4 and (out / "DONE").is_file()
    return out


def test_predict_an_array_with_or_without_a_channel_axis(run_dir):
    run = sd.load_run(run_dir)
    case = make_synthetic_case(5, dims=2, shape=(40, 28))
    mask = run.predict(case.image)  # (1, 40, 28)
    assert mask.shape == (40, 28) and mask.dtype == np.int64 and set(np.unique(mask)) <= {0, 1}
    assert np.array_equal(run.predict(case.image[0]), mask)  # (40, 28): one channel implied
    probs = run.predict(case.image, probabilities=True)
    assert probs.shape == (2, 40, 28) and np.allclose(probs.sum(0), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(0), mask)
    volume = run.predict(np.stack([case.image[0]] * 3, axis=-1))  # a volume through the 2D net, slice by slice
    # the same slice as the 2D image: the same mask, except where a 4-step net is within float noise of 0.5 (a
    # batch of 3 slices and a batch of 1 take different CPU kernels; seen: 1e-3 apart, one pixel flipped)
    sure = np.abs(probs[1] - 0.5) > 0.01
    assert volume.shape == (40, 28, 3) and np.array_equal(volume[..., 1][sure], mask[sure]) and sure.mean() > 0.9


def test_predict_a_file_and_refuse_what_does_not_fit(run_dir, tmp_path):
    import nibabel as nib

    run = sd.load_run(run_dir)
    case = make_synthetic_case(6, dims=2, shape=(30, 30))
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(case.image[0][..., None].astype(np.float32), np.diag([0.7, 0.7, 2.0, 1.0])), path)
    mask = run.predict(path)
    assert mask.shape == (30, 30, 1) and np.array_equal(mask[..., 0], run.predict(case.image))
    with pytest.raises(InputError, match="does not fit this model"):
        run.predict(np.zeros((3, 2, 16, 16), np.float32))  # 3 channels into a 1-channel model
    assert sd.load_config("demo")["data"]["format"] == "synthetic"
    with pytest.raises(AttributeError):
        sd.no_such_name  # noqa: B018
