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


def _oblique_case(tmp_path):
    """A NIfTI volume stored LPS-like with permuted axes: voxel axis 0 runs along S, 1 along -R (L), 2 along -A."""
    affine = np.array([[0, -0.5, 0, 50.0], [0, 0, -1.0, 20.0], [2.0, 0, 0, -10.0], [0, 0, 0, 1]])
    rng = np.random.default_rng(1)
    image = rng.standard_normal((6, 20, 10)).astype(np.float32)
    label = (image > 1).astype(np.uint8)
    _nii(tmp_path / "images" / "c1.nii.gz", image, affine)
    _nii(tmp_path / "labels" / "c1.nii.gz", label, affine)
    (ref,) = discover("volumes", tmp_path)
    return load_case(ref), affine


def test_orientation_turns_cases_to_ras_and_predictions_back(tmp_path):
    from superdiffusion.config import load_config
    from superdiffusion.data.pipeline import WorkingGrid, prepare_case
    from superdiffusion.evaluation.inference import predict_probabilities

    case, affine = _oblique_case(tmp_path)
    data_cfg = load_config(None, ["data.orientation=RAS"])["data"]
    grid = WorkingGrid(case, data_cfg)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(case.image[0], affine))
    working = grid.to_working(case.image)
    assert np.array_equal(working[0], np.asarray(canonical.dataobj))  # nibabel's own RAS reorientation
    assert grid.spacing == pytest.approx(canonical.header.get_zooms())
    assert np.array_equal(grid.to_case(working).numpy(), case.image)
    prepared = prepare_case(case, data_cfg)
    assert prepared.image.shape[1:] == canonical.shape and prepared.label.sum() == case.label.sum()

    def pointwise(x):  # a voxel-wise "network": its prediction must not depend on the voxel order
        return torch.cat([-x[:, :1], x[:, :1]], dim=1)

    import torch

    turned = predict_probabilities(pointwise, case, data_cfg=data_cfg, dims=3, patch=[8, 8, 8])
    plain = predict_probabilities(pointwise, case, data_cfg=load_config(None, [])["data"], dims=3, patch=[8, 8, 8])
    assert turned.shape == (2, *case.spatial_shape) and np.allclose(turned, plain, atol=1e-5)


def test_target_spacing_resamples_by_the_cases_voxel_size(tmp_path):
    from superdiffusion.config import load_config
    from superdiffusion.data.pipeline import prepare_case

    case, _ = _oblique_case(tmp_path)
    cfg = load_config(None, ["data.orientation=RAS", "data.spacing=[1.0, 1.0, 1.0]"])["data"]
    prepared = prepare_case(case, cfg)  # RAS: 20 x 0.5 mm, 10 x 1 mm, 6 x 2 mm -> 1 mm everywhere
    assert prepared.image.shape == (1, 10, 10, 12) and prepared.label.shape == (10, 10, 12)
    with pytest.raises(InputError, match="data.scale, data.size and data.spacing"):
        prepare_case(case, {**cfg, "size": [8, 8, 8]})
