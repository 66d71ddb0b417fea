"""The README's quick start on the user's own data, end to end, in-process: plan a folder in nnU-Net's raw layout,
train on it without a YAML file, predict its imagesTs and score the masks (tiny: seconds)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from superdiffusion.cli.main import main
from superdiffusion.config import read_stored_config
from superdiffusion.data.plan import plan_config

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])
TINY = ["train.steps=4", "train.val_every=2", "train.ckpt_every=2", "train.batch_size=2",
        "train.unlabelled_batch_size=2", "model.channels=[4, 8]", "model.dropout=0.0", "train.threads=1"]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture
def dataset(tmp_path):
    """Dataset001_Blob: 6 labelled + 2 label-less training volumes of 24x24x8, 2 test volumes with labels."""
    root, rng = tmp_path / "Dataset001_Blob", np.random.default_rng(0)
    for part in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / part).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0,
                                                   "blob": 1}, "numTraining": 8, "file_ending": ".nii.gz"}))
    for i in range(10):
        label = np.zeros((24, 24, 8), np.uint8)
        x, y = rng.integers(7, 17, 2)
        label[x - 5:x + 5, y - 5:y + 5, 1:7] = 1
        image = (label + rng.normal(0, 0.2, label.shape)).astype(np.float32)
        part = "Tr" if i < 8 else "Ts"
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / f"images{part}" / f"blob{i:02d}_0000.nii.gz"))
        if i < 6 or i >= 8:
            nib.save(nib.Nifti1Image(label, AFFINE), str(root / f"labels{part}" / f"blob{i:02d}.nii.gz"))
    return root


def test_quick_start_on_an_nnunet_folder(dataset, tmp_path, capsys):
    data, run, pred = str(dataset), str(tmp_path / "run"), str(tmp_path / "pred")
    assert main(["plan", "--data", data]) == 0
    plan = capsys.readouterr().out
    assert "nnU-Net" in plan and "8: 1 validation, 5 labelled, 2 unlabelled" in plan, plan

    assert main(["train", "--data", data, "--method", "unimatch", "--out", run, "--no-progress", *_sets(TINY)]) == 0
    out = capsys.readouterr()
    assert "layout:" in out.err and json.loads(out.out.strip().splitlines()[-1])["run"] == run
    planned, _ = plan_config(dataset, method="unimatch", overrides=TINY)
    assert read_stored_config(tmp_path / "run" / "config.yaml") == planned  # the plan is the run's config
    assert set(json.loads((tmp_path / "run" / "split.json").read_text())["unlabelled"]) == {"blob06", "blob07"}

    assert main(["predict", run, f"{data}/imagesTs", "--out", pred, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--pred", pred, "--gt", f"{data}/labelsTs"]) == 0
    assert json.loads(capsys.readouterr().out)["n_cases"] == 2


def test_plan_file_then_train_it_and_bad_combinations(dataset, tmp_path, capsys):
    cfg_file = tmp_path / "plan.yaml"
    assert main(["plan", "--data", str(dataset), "--method", "supervised", "--out", str(cfg_file)]) == 0
    assert read_stored_config(cfg_file) == plan_config(dataset, method="supervised")[0]
    capsys.readouterr()
    for argv, needle in ((["plan", "--data", str(dataset), "--out", str(cfg_file)], "exists already"),
                         (["plan"], "--data DIR is required"),
                         (["train"], "give a CONFIG"),
                         (["train", "demo", "--data", str(dataset)], "not both"),
                         (["train", "demo", "--method", "fixmatch"], "only with --data"),
                         (["bench", "--out", str(tmp_path / "b")], "--protocol NAME or --data DIR"),
                         (["plan", "--data", str(tmp_path / "nowhere")], "does not exist")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)


def test_bench_plans_a_protocol(dataset, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--data", str(dataset), "--methods", "supervised,fixmatch", "--out", str(out), "--report-only",
            "--no-progress"]
    assert main(argv) == 0 and main(argv) == 0  # the second finds the same plan there
    protocol = out / "Dataset001_Blob.yaml"
    assert protocol.is_file() and (out / "summary.md").is_file()
    assert "layout:" in capsys.readouterr().err
