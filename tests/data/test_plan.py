"""The planner (data/plan.py): a dataset folder in, a normal full config out, as nnU-Net plans one; and the hints
that name the right data.format when a shipped config is pointed at a folder of another layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from superdiffusion.config import load_config
from superdiffusion.data.pipeline import case_ids, split_cases
from superdiffusion.data.plan import _fit, plan_config
from superdiffusion.data.readers import detect_format, discover
from superdiffusion.data.synthetic import write_synthetic_dataset
from superdiffusion.errors import InputError

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])  # anisotropic: slices along the coarse third axis


def write_nnunet(root, *, labelled=6, unlabelled=0, labels=("background", "blob"), shape=(24, 24, 8)):
    """nnU-Net raw: dataset.json, imagesTr/<case>_0000.nii.gz, labelsTr/ for the first `labelled` cases only."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                   "labels": {n: i for i, n in enumerate(labels)},
                                                   "numTraining": labelled + unlabelled}))
    for part in ("imagesTr", "labelsTr"):
        (root / part).mkdir()
    for i in range(labelled + unlabelled):
        label = np.zeros(shape, np.uint8)
        x, y = rng.integers(6, 18, 2)
        label[x - 4:x + 4, y - 4:y + 4, 2:6] = 1
        image = (label + rng.normal(0, 0.3, shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / "imagesTr" / f"c{i:02d}_0000.nii.gz"))
        if i < labelled:
            nib.save(nib.Nifti1Image(label, AFFINE), str(root / "labelsTr" / f"c{i:02d}.nii.gz"))
    return root


def test_nnunet_3d_every_case_labelled(tmp_path):
    root = write_nnunet(tmp_path / "Dataset001_Blob", labelled=10, labels=("background", "a", "b"))
    cfg, lines = plan_config(root, method="supervised", out=tmp_path / "plan.yaml")
    d, s = cfg["data"], cfg["split"]
    assert (d["format"], d["root"], d["num_classes"], d["dims"], d["slice_axis"]) == ("nnunet", str(root), 3, 2, 2)
    assert d["size"] == [32, 32, None] and cfg["train"]["patch"] == [32, 32]  # 24 -> a multiple of 16
    assert (s["val"], s["labelled"]) == (2, 8)  # 20 % validate, every other case labelled
    assert 5 <= len(lines) <= 8 and lines[0].startswith("layout:") and "3 classes (dataset.json)" in lines[2]
    assert "10: 2 validation, 8 labelled, 0 unlabelled" in lines[1] and lines[-1].endswith("plan.yaml")
    semi, _ = plan_config(root, method="superdiffusion")  # needs unlabelled cases: a tenth of them labelled
    assert (semi["split"]["val"], semi["split"]["labelled"]) == (2, 1)
    assert semi["train"]["unlabelled_batch_size"] == 8  # la2d's setting for superdiffusion
    assert plan_config(root, method="fixmatch", labelled=3)[0]["split"]["labelled"] == 3
    with pytest.raises(InputError, match="--labelled 9: must be 1..8"):
        plan_config(root, labelled=9)
    with pytest.raises(InputError, match="leaves none"):
        plan_config(root, method="fixmatch", labelled=8)


def test_label_less_cases_become_the_unlabelled_pool(tmp_path):
    root = write_nnunet(tmp_path / "Dataset002_Blob", labelled=6, unlabelled=3)
    cfg, lines = plan_config(root, method="fixmatch", overrides=["train.steps=7"])
    assert (cfg["split"]["val"], cfg["split"]["labelled"], cfg["train"]["steps"]) == (1, 5, 7)
    assert "9: 1 validation, 5 labelled, 3 unlabelled (3 without a label file)" in lines[1], lines
    split = split_cases(cfg)
    assert split["unlabelled"] == ["c06", "c07", "c08"] and set(split["labelled"] + split["val"]) == {
        f"c{i:02d}" for i in range(6)}
    path = tmp_path / "cfg.yaml"  # a normal full config: it loads as one
    path.write_text(json.dumps(cfg))
    assert load_config(path) == cfg
    cfg3, lines3 = plan_config(root, dims=3)
    assert cfg3["data"]["dims"] == 3 and cfg3["train"]["patch"] == [32, 32, 16] and "3D U-Net" in lines3[3]


def test_2d_png_folder(tmp_path):
    root = write_synthetic_dataset(tmp_path / "skin", 6, dims=2, shape=(48, 80), fmt="folders", channels=3)
    (root / "labels" / "synth005.png").unlink()  # an image without a mask: unlabelled
    cfg, lines = plan_config(root, method="supervised")
    assert (cfg["data"]["format"], cfg["data"]["size"], cfg["data"]["num_classes"]) == ("folders", [48, 80], 2)
    assert (cfg["split"]["val"], cfg["split"]["labelled"]) == (1, 4) and "3 channels" in lines[2]
    for i in range(6):  # class indices 0..2 as grey values: three classes
        mask = np.zeros((48, 80), np.uint8)
        mask[5:20, 5:20], mask[30:40, 40:70] = 1, 2
        Image.fromarray(mask).save(root / "labels" / f"synth{i:03d}.png")
    assert plan_config(root, method="supervised")[0]["data"]["num_classes"] == 3
    assert _fit([300, 500], 256) == [160, 256] and _fit([8, 20], 256) == [16, 16]
    with pytest.raises(InputError, match="--dims 3"):
        plan_config(root, dims=3)


def test_empty_or_unknown_folder_is_one_line(tmp_path):
    for folder in (tmp_path / "empty", tmp_path / "notes"):
        folder.mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    for folder in (tmp_path / "empty", tmp_path / "notes", tmp_path / "missing"):
        with pytest.raises(InputError) as info:
            plan_config(folder)
        assert str(folder) in str(info.value) and "\n" not in str(info.value)
    assert detect_format(tmp_path / "empty") is None
    (tmp_path / "wrap").mkdir()
    write_nnunet(tmp_path / "wrap" / "Dataset003")
    with pytest.raises(InputError, match="it holds one folder: try --data"):
        plan_config(tmp_path / "wrap")


def test_misfit_hints_name_the_format(tmp_path):
    nnunet = write_nnunet(tmp_path / "Dataset004_Blob")
    pngs = write_synthetic_dataset(tmp_path / "pngs", 2, dims=2, shape=(16, 16), fmt="folders")
    cfg = load_config("la2d-supervised", [f"data.root={nnunet}"])  # its list file is not there either
    with pytest.raises(InputError, match=f"{nnunet} has a dataset.json: --set data.format=nnunet --set data.list=null "
                                         rf"\(or `superdiffusion train --data {nnunet}`\)"):
        case_ids(cfg["data"])
    with pytest.raises(InputError, match="holds 2D images .*--set data.format=folders"):
        discover("volumes", pngs)
    with pytest.raises(InputError, match="no dataset.json.*--set data.format=folders"):
        discover("nnunet", pngs)
    with pytest.raises(InputError, match="data.format is synthetic.*--set data.format=nnunet"):
        case_ids(load_config("demo", [f"data.root={nnunet}"])["data"])
