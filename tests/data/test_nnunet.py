"""data.format: nnunet, nnU-Net v2's raw layout read as it is: dataset.json's labels (the class count),
channel_names (multi-channel input) and file_ending (.nii.gz, .nrrd, .mha); predictions named <case><ending>, so
they pair with labelsTr."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from superdiffusion.cli.main import main
from superdiffusion.config import load_config
from superdiffusion.data.pipeline import input_refs, list_refs
from superdiffusion.data.readers import discover, load_case, read_geometry, write_mask
from superdiffusion.errors import InputError

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])


def _write(path, array, ending):
    path.parent.mkdir(parents=True, exist_ok=True)
    if ending == ".mha":
        import SimpleITK as sitk  # noqa: N813

        img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose()))
        img.SetSpacing([0.8, 0.8, 2.0])
        img.SetOrigin([10.0, -5.0, 3.0])
        sitk.WriteImage(img, str(path))
    else:
        nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def make_dataset(root, *, cases=4, ending=".nii.gz", test=1):
    rng = np.random.default_rng(0)
    (root).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "left": 1, "right": 2},
        "numTraining": cases, "file_ending": ending}))
    for part, n in (("Tr", cases), ("Ts", test)):
        for i in range(n):
            label = np.zeros((24, 24, 8), np.uint8)
            label[4:10, 5:12, 2:6], label[14:20, 12:20, 3:7] = 1, 2
            for c in range(2):
                image = (label * (1.0 + c) + rng.normal(0, 0.3, label.shape)).astype(np.float32)
                _write(root / f"images{part}" / f"case{i}_{c:04d}{ending}", image, ending)
            if part == "Tr":
                _write(root / "labelsTr" / f"case{i}{ending}", label, ending)
    return root


def test_cases_channels_and_labels_as_dataset_json_says(tmp_path):
    root = make_dataset(tmp_path / "Dataset001_Toy")
    refs = discover("nnunet", root)
    assert [r.id for r in refs] == [f"case{i}" for i in range(4)] and all(len(r.channels) == 1 for r in refs)
    case = load_case(refs[0], num_classes=3)
    assert case.image.shape == (2, 24, 24, 8) and case.label.max() == 2
    fg = case.label == 2  # channel c holds label * (1 + c): the channels came in order, _0000 then _0001
    assert case.image[1][fg].mean() == pytest.approx(2 * case.image[0][fg].mean(), rel=0.1)
    assert [r.id for r in discover("nnunet", root, subset="test")] == ["case0"]  # imagesTs, no labels
    cfg = load_config(None, ["data.format=nnunet", f"data.root={root}"])
    with pytest.raises(InputError, match="lists 3 labels.*data.num_classes=3"):
        list_refs(cfg["data"])
    (root / "imagesTr" / "case3_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"case 'case3' has channel files \[0\].*missing _0001"):
        discover("nnunet", root)
    (root / "dataset.json").unlink()
    with pytest.raises(InputError, match="no dataset.json"):
        discover("nnunet", root)


def test_mha_volumes_read_and_written_with_their_geometry(tmp_path):
    root = make_dataset(tmp_path / "Dataset002_Mha", cases=1, ending=".mha", test=0)
    (ref,) = discover("nnunet", root)
    case = load_case(ref, num_classes=3)
    assert ref.format == "mha" and case.image.shape == (2, 24, 24, 8) and case.spacing == (0.8, 0.8, 2.0)
    out = write_mask(case.label, case, tmp_path / "out", num_classes=3)
    assert out.name == "case0.mha"
    assert np.allclose(read_geometry(out), read_geometry(root / "labelsTr" / "case0.mha"))


def test_train_predict_and_evaluate_against_labels_tr(tmp_path, capsys):
    root = make_dataset(tmp_path / "Dataset003_Toy")
    run = tmp_path / "run"
    sets = ["data.format=nnunet", f"data.root={root}", "data.num_classes=3", "data.dims=2", "split.labelled=3",
            "split.val=1", "model.channels=[4, 8]", "train.steps=3", "train.patch=[32, 32]", "train.batch_size=2",
            "train.val_every=0", "train.threads=1", "method=supervised"]
    assert main(["train", "demo", "--out", str(run), "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    masks = tmp_path / "masks"
    assert main(["predict", str(run), str(root / "imagesTr"), "--out", str(masks), "--no-progress"]) == 0
    written = sorted(p.name for p in masks.iterdir() if not p.name.startswith("."))  # the dot-file: predict's stamp
    assert written == [f"case{i}.nii.gz" for i in range(4)]  # no _0000
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(masks), "--gt", str(root / "labelsTr"), "--num-classes", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["n_cases"] == 4
    (ref,) = input_refs([root / "imagesTs"])
    assert ref.id == "case0" and len(ref.channels) == 1
