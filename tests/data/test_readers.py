"""Readers on files written here at test time: every format, the mask round trip, every bad input."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import nrrd
import numpy as np
import pytest
import tifffile
from PIL import Image

from superdiffusion.data.case import Case, CaseRef
from superdiffusion.data.readers import discover, load_case, read_mask, write_array, write_mask
from superdiffusion.errors import InputError

REAL_LA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "LA"
RNG = np.random.default_rng(0)


def _vol(shape=(6, 5, 4)) -> tuple[np.ndarray, np.ndarray]:
    image = RNG.standard_normal(shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[1:4, 1:3, 1:3] = 1
    return image, label


def _h5(path: Path, image=None, label=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if image is not None:
            f.create_dataset("image", data=image)
        if label is not None:
            f.create_dataset("label", data=label)
    return path


def _nii(path: Path, data: np.ndarray, zooms=(0.5, 0.7, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))
    return path


def _img(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, arr)
    else:
        Image.fromarray(arr).save(path)
    return path


def _mask2d(shape=(8, 10), value=255) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[2:5, 3:7] = value
    return m


def _raises(match_path: Path | str, fn, *args, **kwargs) -> str:
    """Assert an InputError with a one-line message naming the file; return the message."""
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and str(match_path) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ formats
def test_la_h5_discover_list_and_load(tmp_path):
    cases = {i: _vol((6 + k, 5, 4)) for k, i in enumerate(["b", "a", "c"])}
    for i, (im, lab) in cases.items():
        _h5(tmp_path / i / "mri_norm2.h5", im, lab)
    (tmp_path / "stray").mkdir()
    assert [r.id for r in discover("la", tmp_path)] == ["a", "b", "c"]
    (tmp_path / "train.list").write_text("  c\n\na \n")
    refs = discover("la", tmp_path, "train.list")  # relative list path resolved against root
    assert [r.id for r in refs] == ["a", "c"] and refs[0].format == "la-h5"
    case = load_case(refs[1])
    assert case.image.shape == (1, 8, 5, 4) and case.image.dtype == np.float32
    assert case.label.dtype == np.int64 and np.array_equal(case.label, cases["c"][1])
    assert np.array_equal(case.image[0], cases["c"][0]) and case.spacing == (1.0, 1.0, 1.0)
    assert case.meta["format"] == "la-h5" and case.meta["suffix"] == ".h5"


def test_la_with_label_false_never_reads_label(tmp_path, monkeypatch):
    im, _ = _vol()
    path = _h5(tmp_path / "u" / "mri_norm2.h5", im, None)  # unlabelled: no label dataset at all
    ref = discover("la", tmp_path)[0]
    case = load_case(ref, with_label=False)
    assert case.label is None and case.image.shape == (1, *im.shape)
    assert "label" in _raises(path, load_case, ref)
    # a labelled file: reading it must not touch the 'label' dataset either
    _h5(path, im, np.zeros(im.shape, np.uint8))
    opened: list[str] = []
    orig = h5py.Group.__getitem__
    monkeypatch.setattr(h5py.Group, "__getitem__", lambda self, k: (opened.append(k), orig(self, k))[1])
    load_case(ref, with_label=False)
    assert "label" not in opened and "image" in opened


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nifti_spacing_affine_and_unlabelled(tmp_path, ext):
    im, lab = _vol()
    _nii(tmp_path / "images" / f"p1{ext}", im)
    _nii(tmp_path / "labels" / f"p1{ext}", lab)
    _nii(tmp_path / "images" / f"p2{ext}", im)  # no label
    refs = discover("volumes", tmp_path)
    assert [(r.id, r.format, r.label is None) for r in refs] == [
        ("p1", "nifti", False),
        ("p2", "nifti", True),
    ]
    case = load_case(refs[0])
    assert case.spacing == pytest.approx((0.5, 0.7, 2.0)) and case.meta["suffix"] == ext
    assert np.allclose(case.meta["affine"], np.diag([0.5, 0.7, 2.0, 1.0]))
    assert np.array_equal(case.label, lab) and np.allclose(case.image[0], im)
    assert load_case(refs[1]).label is None


def test_nnunet_layout(tmp_path):
    im, lab = _vol()
    _nii(tmp_path / "imagesTr" / "la_003_0000.nii.gz", im)
    _nii(tmp_path / "labelsTr" / "la_003.nii.gz", lab)
    (ref,) = discover("volumes", tmp_path)
    assert ref.id == "la_003" and np.array_equal(load_case(ref).label, lab)


def test_nrrd_and_nhdr_spacing(tmp_path):
    im, lab = _vol()
    hdr = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.8, 0.8, 2.5]),
        "space origin": np.zeros(3),
    }
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    nrrd.write(str(tmp_path / "images" / "q.nrrd"), im, hdr)
    nrrd.write(str(tmp_path / "labels" / "q.nrrd"), lab, hdr)
    nrrd.write(
        str(tmp_path / "images" / "r.nhdr"), im, {"spacings": np.array([1.5, 1.0, 3.0])}, detached_header=True
    )
    q, r = discover("volumes", tmp_path)
    assert q.format == r.format == "nrrd"
    case = load_case(q)
    assert case.spacing == pytest.approx((0.8, 0.8, 2.5)) and np.array_equal(case.label, lab)
    assert case.meta["header"]["space"] == "left-posterior-superior"
    assert load_case(r).spacing == pytest.approx((1.5, 1.0, 3.0))


def test_glas_instances_and_subsets(tmp_path):
    for name in ["train_1", "train_2", "testA_1", "testB_1"]:
        _img(tmp_path / f"{name}.bmp", RNG.integers(0, 255, (8, 10, 3), dtype=np.uint8))
        anno = np.zeros((8, 10), np.uint8)
        anno[1:3, 1:3], anno[5:7, 5:9] = 1, 7  # gland instances
        _img(tmp_path / f"{name}_anno.bmp", anno)
    (tmp_path / "Grade.csv").write_text("name,grade\n")
    assert [r.id for r in discover("glas", tmp_path)] == ["testA_1", "testB_1", "train_1", "train_2"]
    assert [r.id for r in discover("glas", tmp_path, subset="train")] == ["train_1", "train_2"]
    assert [r.id for r in discover("glas", tmp_path, subset="test")] == ["testA_1", "testB_1"]
    assert [r.id for r in discover("glas", tmp_path, subset="testB")] == ["testB_1"]
    case = load_case(discover("glas", tmp_path, subset="testA")[0])
    assert case.image.shape == (3, 8, 10) and set(np.unique(case.label)) == {0, 1}
    assert case.meta["suffix"] == ".bmp"
    _raises("subset", discover, "glas", tmp_path, subset="val")


def test_ph2_layout(tmp_path):
    base = tmp_path / "PH2 Dataset images"
    for i in ["IMD003", "IMD002"]:
        _img(
            base / i / f"{i}_Dermoscopic_Image" / f"{i}.bmp", RNG.integers(0, 255, (8, 10, 3), dtype=np.uint8)
        )
        _img(base / i / f"{i}_lesion" / f"{i}_lesion.bmp", _mask2d())
    refs = discover("ph2", tmp_path)
    assert [r.id for r in refs] == ["IMD002", "IMD003"]
    case = load_case(refs[0])
    assert case.image.shape == (3, 8, 10) and np.array_equal(case.label, _mask2d(value=1))


@pytest.mark.parametrize("lab_dir", ["labels", "masks"])
def test_folders_png_tif_bmp_jpg(tmp_path, lab_dir):
    images = {
        "a.png": RNG.integers(0, 255, (8, 10), dtype=np.uint8),
        "b.tif": RNG.standard_normal((8, 10)).astype(np.float32),
        "c.bmp": RNG.integers(0, 255, (8, 10, 3), dtype=np.uint8),
        "d.jpg": RNG.integers(0, 255, (8, 10, 3), dtype=np.uint8),
        "e.png": RNG.integers(0, 255, (8, 10, 4), dtype=np.uint8),
    }
    for name, arr in images.items():
        _img(tmp_path / "images" / name, arr)
        _img(tmp_path / lab_dir / f"{Path(name).stem}.png", _mask2d())
    _img(tmp_path / lab_dir / "e.png", np.stack([_mask2d()] * 3, -1))  # RGB mask: first channel
    refs = discover("folders", tmp_path)
    assert [r.id for r in refs] == ["a", "b", "c", "d", "e"]
    cases = [load_case(r) for r in refs]
    assert [c.image.shape[0] for c in cases] == [1, 1, 3, 3, 3]
    assert np.array_equal(cases[1].image[0], images["b.tif"])
    for c in cases:
        assert c.image.dtype == np.float32 and c.spacing == (1.0, 1.0)
        assert np.array_equal(c.label, _mask2d(value=1)) and c.label.dtype == np.int64


def test_folders_with_label_false_without_label_file(tmp_path):
    _img(tmp_path / "images" / "a.png", RNG.integers(0, 255, (8, 10), dtype=np.uint8))
    lab = _img(tmp_path / "labels" / "a.png", _mask2d())
    (ref,) = discover("folders", tmp_path)
    lab.unlink()
    assert load_case(ref, with_label=False).label is None
    _raises(lab, load_case, ref)


def test_label_mapping_options(tmp_path):
    _img(tmp_path / "images" / "a.png", RNG.integers(0, 255, (8, 10), dtype=np.uint8))
    _img(tmp_path / "labels" / "a.png", _mask2d(value=3))
    (ref,) = discover("folders", tmp_path)
    assert load_case(ref, num_classes=4).label.max() == 3
    assert load_case(ref, binarize=True).label.max() == 1
    _img(tmp_path / "labels" / "a.png", _mask2d(value=255))
    assert load_case(ref, binarize=False, num_classes=256).label.max() == 255


# ------------------------------------------------------------------------------------------ writing
def _roundtrip(case: Case, tmp_path: Path, ext: str) -> None:
    mask = (case.image[0] > 0).astype(np.int64)
    path = write_mask(mask, case, tmp_path / "out")
    assert path.name == f"{case.id}{ext}"
    back, spacing = read_mask(path)
    assert back.dtype == np.int64 and np.array_equal(back, mask)
    assert spacing == pytest.approx(case.spacing)
    _raises(path, write_mask, mask, case, tmp_path / "out")  # never overwrite silently
    assert write_mask(1 - mask, case, tmp_path / "out", overwrite=True) == path
    assert np.array_equal(read_mask(path)[0], 1 - mask)


def test_write_mask_la_h5(tmp_path):
    im, lab = _vol()
    case = load_case(CaseRef("x", _h5(tmp_path / "x" / "mri_norm2.h5", im, lab), None, "la-h5"))
    _roundtrip(case, tmp_path, ".h5")
    with h5py.File(tmp_path / "out" / "x.h5") as f:
        assert f["label"].dtype == np.uint8 and f["label"].compression == "gzip"


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_write_mask_nifti_keeps_affine(tmp_path, ext):
    affine = np.array([[0, -0.5, 0, 10], [0.7, 0, 0, -3], [0, 0, 2.0, 4], [0, 0, 0, 1]])
    path = tmp_path / f"v{ext}"
    nib.save(nib.Nifti1Image(_vol()[0], affine), str(path))
    case = load_case(CaseRef("v", path, None, "nifti"))
    _roundtrip(case, tmp_path, ext)  # the input's own format: .nii in, .nii out
    assert np.allclose(nib.load(str(tmp_path / "out" / f"v{ext}")).affine, affine)


def test_write_mask_nrrd_keeps_geometry(tmp_path):
    hdr = {
        "space": "right-anterior-superior",
        "space directions": np.diag([0.8, 0.9, 2.5]),
        "space origin": np.array([1.0, 2.0, 3.0]),
    }
    nrrd.write(str(tmp_path / "v.nrrd"), _vol()[0], hdr)
    case = load_case(CaseRef("v", tmp_path / "v.nrrd", None, "nrrd"))
    _roundtrip(case, tmp_path, ".nrrd")
    out = nrrd.read_header(str(tmp_path / "out" / "v.nrrd"))
    assert np.allclose(out["space directions"], hdr["space directions"]) and out["space"] == hdr["space"]
    assert np.allclose(out["space origin"], hdr["space origin"])


@pytest.mark.parametrize(
    ("name", "ext"), [("a.png", ".png"), ("a.bmp", ".bmp"), ("a.jpg", ".png"), ("a.tif", ".png")]
)
def test_write_mask_2d(tmp_path, name, ext):
    path = _img(tmp_path / name, RNG.integers(0, 255, (8, 10), dtype=np.uint8))
    _roundtrip(load_case(CaseRef("a", path, None, "image2d")), tmp_path, ext)


def test_write_array_float_maps(tmp_path):
    path = _nii(tmp_path / "v.nii.gz", _vol()[0])
    case3 = load_case(CaseRef("v", path, None, "nifti"))
    unc = RNG.random(case3.spatial_shape).astype(np.float64)
    out = write_array(unc, case3, tmp_path / "o", "_unc")
    assert out.name == "v_unc.nii.gz"
    data = nib.load(str(out)).get_fdata(dtype=np.float32)
    assert np.allclose(data, unc, atol=1e-6) and nib.load(str(out)).get_data_dtype() == np.float32
    case2 = load_case(CaseRef("a", _img(tmp_path / "a.png", _mask2d()), None, "image2d"))
    out2 = write_array(np.full((8, 10), 0.25), case2, tmp_path / "o", "_unc")
    assert out2.name == "a_unc.tif" and tifffile.imread(out2).dtype == np.float32
    _raises(out2, write_array, np.zeros((8, 10)), case2, tmp_path / "o", "_unc")


# ------------------------------------------------------------------------------------------ bad inputs
def test_missing_root_unknown_format_and_empty(tmp_path):
    _raises(tmp_path / "nope", discover, "la", tmp_path / "nope")
    assert "folders" in _raises("bogus", discover, "bogus", tmp_path)
    msg = _raises(tmp_path, discover, "volumes", tmp_path)
    assert msg == f"no cases found in {tmp_path} (format volumes)"


def test_list_file_problems(tmp_path):
    _h5(tmp_path / "a" / "mri_norm2.h5", *_vol())
    (tmp_path / "my.list").write_text("a\nzz\n")
    assert "'zz'" in _raises(tmp_path / "my.list", discover, "la", tmp_path, tmp_path / "my.list")
    _raises("missing.list", discover, "la", tmp_path, "missing.list")


def test_missing_image_and_label_files(tmp_path):
    _raises(tmp_path / "gone.nii.gz", load_case, CaseRef("g", tmp_path / "gone.nii.gz", None, "nifti"))
    path = _nii(tmp_path / "v.nii.gz", _vol()[0])
    _raises(tmp_path / "l.nii.gz", load_case, CaseRef("v", path, tmp_path / "l.nii.gz", "nifti"))


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("bad.nii.gz", "nifti"),
        ("bad.nii", "nifti"),
        ("bad.nrrd", "nrrd"),
        ("bad.h5", "la-h5"),
        ("bad.png", "image2d"),
        ("bad.tif", "image2d"),
    ],
)
def test_corrupt_file(tmp_path, name, fmt):
    path = tmp_path / name
    path.write_bytes(b"\x1f\x8b this is not a valid file" * 3)
    assert "cannot read" in _raises(path, load_case, CaseRef("bad", path, None, fmt))


def test_corrupt_label_and_truncated_gzip(tmp_path):
    im, lab = _vol()
    img = _nii(tmp_path / "v.nii.gz", im)
    good = _nii(tmp_path / "l.nii.gz", lab)
    good.write_bytes(good.read_bytes()[:-20])
    _raises(good, load_case, CaseRef("v", img, good, "nifti"))


def test_la_missing_datasets(tmp_path):
    im, lab = _vol()
    no_image = _h5(tmp_path / "a" / "mri_norm2.h5", None, lab)
    assert "'image'" in _raises(no_image, load_case, discover("la", tmp_path)[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_image(tmp_path, bad):
    im, lab = _vol()
    im[2, 2, 2] = bad
    path = _h5(tmp_path / "a" / "mri_norm2.h5", im, lab)
    assert "NaN or Inf" in _raises(path, load_case, discover("la", tmp_path)[0])


def test_shape_mismatch(tmp_path):
    img = _nii(tmp_path / "images" / "v.nii.gz", _vol((6, 5, 4))[0])
    lab = _nii(tmp_path / "labels" / "v.nii.gz", _vol((6, 5, 3))[1])
    msg = _raises(lab, load_case, discover("volumes", tmp_path)[0])
    assert "(6, 5, 3)" in msg and "(6, 5, 4)" in msg and str(img) in msg


def test_label_out_of_range(tmp_path):
    im, lab = _vol()
    lab[0, 0, 0] = 5
    path = _h5(tmp_path / "a" / "mri_norm2.h5", im, lab)
    ref = discover("la", tmp_path)[0]
    assert "5" in _raises(path, load_case, ref)
    assert load_case(ref, num_classes=6).label.max() == 5


@pytest.mark.parametrize("shape", [(6, 5), (2, 6, 5, 4)])
def test_wrong_dimensionality_volume(tmp_path, shape):
    path = _nii(tmp_path / "v.nii.gz", np.zeros(shape, np.float32))
    assert "3D" in _raises(path, load_case, CaseRef("v", path, None, "nifti"))


def test_wrong_dimensionality_2d(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 8, 10, 6), np.float32))
    _raises(path, load_case, CaseRef("s", path, None, "image2d"))


# ------------------------------------------------------------------------------------------ real data
def test_real_la_cases():
    if not (REAL_LA / "train.list").is_file():
        pytest.skip(f"real LA data not present at {REAL_LA}")
    refs = discover("la", REAL_LA, "train.list")
    assert len(refs) == 80
    for ref in refs[:2]:
        case = load_case(ref)
        assert case.image.ndim == 4 and case.image.shape[0] == 1 and case.image.shape[-1] == 88
        assert case.label.shape == case.image.shape[1:] and set(np.unique(case.label)) <= {0, 1}


def test_2d_masks_are_visible_in_a_viewer_and_read_back_as_classes(tmp_path):
    from PIL import Image

    _img(tmp_path / "images" / "a.png", RNG.integers(0, 255, (8, 10), dtype=np.uint8))
    _img(tmp_path / "labels" / "a.png", _mask2d())
    case = load_case(discover("folders", tmp_path)[0])
    mask = np.zeros(case.spatial_shape, np.int64)
    mask[2:5, 3:8] = 1
    binary = write_mask(mask, case, tmp_path / "bin")
    assert set(np.unique(np.asarray(Image.open(binary)))) == {0, 255}  # not 0/1: black in every viewer
    assert np.array_equal(read_mask(binary)[0], mask)
    mask[6:, :4] = 2
    multi = write_mask(mask, case, tmp_path / "multi", num_classes=3)
    with Image.open(multi) as im:
        assert im.mode == "P" and im.getpalette()[3:6] != [0, 0, 0]  # class 1 coloured
    assert np.array_equal(read_mask(multi, num_classes=3)[0], mask)
    assert not [p for p in (tmp_path / "multi").iterdir() if p.name.startswith(".tmp")]  # written atomically
