"""Geometry as MONAI and nnU-Net treat it: image and label must share their grid (checked before training),
predictions keep the input's header (qform/sform codes, units), and `evaluate` refuses a prediction off its
reference's grid unless told --ignore-geometry, and names predictions without a reference."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from superdiffusion.cli.main import main
from superdiffusion.data.readers import discover, load_case, read_geometry, write_mask
from superdiffusion.errors import InputError

AFFINE = np.array([[-0.625, 0, 0, 100.0], [0, 0.625, 0, -50.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def _nii(path, array, affine=AFFINE, *, codes=(1, 1)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def _volume(root, label_affine=AFFINE):
    rng = np.random.default_rng(0)
    _nii(root / "images" / "c1.nii.gz", rng.standard_normal((12, 10, 8)).astype(np.float32))
    label = np.zeros((12, 10, 8), np.uint8)
    label[3:7, 2:6, 2:5] = 1
    _nii(root / "labels" / "c1.nii.gz", label, label_affine)
    return root


def test_image_and_label_on_different_grids_are_refused_naming_the_case(tmp_path):
    moved = AFFINE.copy()
    moved[:3, 3] += [100.0, 0, 0]
    (ref,) = discover("volumes", _volume(tmp_path / "a", moved))
    with pytest.raises(InputError, match=r"labels/c1.nii.gz: label geometry differs .*origin.*'c1'"):
        load_case(ref)
    flipped = AFFINE @ np.diag([1, -1, 1, 1])
    (ref,) = discover("volumes", _volume(tmp_path / "b", flipped))
    with pytest.raises(InputError, match="direction"):
        load_case(ref)
    (ref,) = discover("volumes", _volume(tmp_path / "c"))
    assert load_case(ref).label.sum() == 4 * 4 * 3


def test_masks_keep_the_input_header(tmp_path):
    (ref,) = discover("volumes", _volume(tmp_path / "a"))
    case = load_case(ref)
    out = nib.load(str(write_mask(case.label, case, tmp_path / "out")))
    assert np.allclose(out.affine, AFFINE)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1
    assert out.header.get_xyzt_units() == ("mm", "sec")


def test_evaluate_refuses_predictions_off_the_reference_grid(tmp_path, capsys):
    label = np.zeros((12, 10, 8), np.uint8)
    label[3:7, 2:6, 2:5] = 1
    gt = tmp_path / "gt"
    _nii(gt / "c1.nii.gz", label)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [100.0, 0, 0]  # the same voxels 100 mm away
    _nii(tmp_path / "pred" / "c1.nii.gz", label, shifted)
    _nii(tmp_path / "pred" / "c9.nii.gz", label)  # no reference
    assert not np.allclose(read_geometry(tmp_path / "pred" / "c1.nii.gz"), read_geometry(gt / "c1.nii.gz"))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "c9.nii.gz" in err[0] and "no reference" in err[0]
    assert len(err) == 2 and err[1].startswith("error: ") and "origin" in err[1] and "--ignore-geometry" in err[1]
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(gt), "--ignore-geometry"]) == 0
    report = capsys.readouterr().out
    assert '"unscored_predictions": [\n  "c9"\n ]' in report and '"geometry": "ignored"' in report
