"""Synthetic data: deterministic, realistic foreground fraction, and readable after writing to disk."""

from __future__ import annotations

import numpy as np
import pytest

from superdiffusion.data.readers import discover, load_case, write_mask
from superdiffusion.data.synthetic import make_synthetic_case, make_synthetic_dataset, write_synthetic_dataset
from superdiffusion.errors import InputError


@pytest.mark.parametrize(("dims", "shape"), [(2, (64, 64)), (3, (24, 20, 16))])
def test_shapes_dtypes_and_determinism(dims, shape):
    a = make_synthetic_case(3, dims=dims, shape=shape, seed=1)
    b = make_synthetic_case(3, dims=dims, shape=shape, seed=1)
    c = make_synthetic_case(3, dims=dims, shape=shape, seed=2)
    assert a.id == "synth003" and a.meta == {"format": "synthetic"} and a.spacing == (1.0,) * dims
    assert a.image.shape == (1, *shape) and a.image.dtype == np.float32 and a.label.dtype == np.int64
    assert a.label.shape == shape and set(np.unique(a.label)) == {0, 1}
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.image, c.image) and not np.array_equal(a.label, c.label)
    assert abs(float(a.image.mean())) < 1e-3 and abs(float(a.image.std()) - 1) < 1e-3


def test_foreground_fraction_and_contrast():
    for dims, shape in [(2, (64, 64)), (3, (32, 32, 24))]:
        for case in make_synthetic_dataset(12, dims=dims, shape=shape):
            assert 0.05 <= case.label.mean() <= 0.2
            img = case.image[0]
            assert img[case.label == 1].mean() > img[case.label == 0].mean() + 0.3


def test_dataset_and_channels():
    cases = make_synthetic_dataset(3, dims=2, shape=(32, 32), channels=3)
    assert [c.id for c in cases] == ["synth000", "synth001", "synth002"]
    assert cases[0].image.shape == (3, 32, 32)
    assert np.array_equal(
        make_synthetic_dataset(5, dims=2, shape=(32, 32))[1].label,
        make_synthetic_case(1, dims=2, shape=(32, 32)).label,
    )
    with pytest.raises(InputError):
        make_synthetic_case(0, dims=3, shape=(32, 32))


@pytest.mark.parametrize(
    ("fmt", "dims", "shape"),
    [
        ("la", 3, (16, 12, 8)),
        ("volumes", 3, (16, 12, 8)),
        ("volumes-nrrd", 3, (16, 12, 8)),
        ("folders", 2, (24, 20)),
    ],
)
def test_write_and_read_back(tmp_path, fmt, dims, shape):
    root = write_synthetic_dataset(tmp_path / fmt, 2, dims=dims, shape=shape, seed=4, fmt=fmt)
    refs = discover(fmt.split("-")[0], root, "train.list" if fmt == "la" else None)
    assert [r.id for r in refs] == ["synth000", "synth001"]
    want = make_synthetic_case(1, dims=dims, shape=shape, seed=4)
    got = load_case(refs[1])
    assert np.array_equal(got.label, want.label) and got.image.shape == want.image.shape
    if dims == 3:
        assert np.allclose(got.image, want.image, atol=1e-6)
    with pytest.raises(InputError):
        write_synthetic_dataset(tmp_path / fmt, 2, dims=dims, shape=shape, seed=4, fmt=fmt)


def test_write_mask_for_synthetic_cases(tmp_path):
    c2 = make_synthetic_case(0, dims=2, shape=(16, 16))
    c3 = make_synthetic_case(0, dims=3, shape=(12, 12, 8))
    assert write_mask(c2.label, c2, tmp_path).name == "synth000.png"
    assert write_mask(c3.label, c3, tmp_path).name == "synth000.nii.gz"
