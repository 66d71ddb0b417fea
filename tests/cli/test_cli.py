"""The command line, in-process: help texts, train -> evaluate -> predict on LA-h5 data written here, and
every bad input answered by exit status 2 and exactly one `error:` line naming the file or value."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from superdiffusion.cli.main import build_parser, main
from superdiffusion.data.splits import make_split
from superdiffusion.data.synthetic import make_synthetic_dataset, write_synthetic_dataset
from superdiffusion.evaluation.evaluate import STAMP

METRICS = ("dice", "jaccard", "hd95", "asd")
OPTIONS = {
    None: ["--help", "train", "evaluate", "predict", "demo"],
    "train": ["--help", "config", "--set", "--out", "--resume", "--no-progress"],
    "evaluate": ["--help", "run", "--data", "--list", "--format", "--pred", "--gt", "--num-classes", "--checkpoint",
                 "--predictor", "--out"],
    "predict": ["--help", "run", "INPUT", "--out", "--checkpoint", "--predictor"],
    "demo": ["--help", "--out", "--steps", "--no-progress"],
}


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not named in: {lines[0]}"
    return lines[0]


# --------------------------------------------------------------------------------------------- help
def _defined_options(command: str | None) -> set[str]:
    """Every option string the parser itself defines for `command` (so options added later are covered)."""
    parser = build_parser()
    if command is not None:
        parser = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s for a in parser._actions for s in a.option_strings}


def _commands() -> list[str]:
    return list(next(a for a in build_parser()._actions if a.dest == "command").choices)


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help_exits_zero_and_mentions_every_option(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in set(OPTIONS.get(command, ["--help"])) | _defined_options(command):
        assert option in out, f"{option} missing from `{' '.join(argv)}`"


def test_documented_commands_exist():
    assert {c for c in OPTIONS if c} <= set(_commands())


# --------------------------------------------------------------------------------------- a trained run
def _train_argv(run: Path, overrides: list[str]) -> list[str]:
    return ["train", "demo", "--out", str(run), "--no-progress", *_sets(overrides)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, la_root, la_sets) -> Path:
    """A supervised 2D run on slices of the LA-h5 dataset these tests share, trained through the CLI."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(_train_argv(run, la_sets(la_root))) == 0
    assert (run / "results.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
    return run


def test_train_prints_a_summary(tmp_path, la_root, la_sets, capsys):
    run = tmp_path / "run"
    assert main(_train_argv(run, la_sets(la_root, "train.steps=2"))) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["run"] == str(run) and summary["predictor"] == "student"
    assert set(METRICS) <= set(summary)
    assert json.loads((run / "split.json").read_text())["labelled"]


def test_evaluate_run_on_data_with_list(trained, la_root, tmp_path, capsys):
    ids = ["synth001", "synth004", "synth006"]
    list_file = tmp_path / "eval.list"
    list_file.write_text("\n".join(ids) + "\n")
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(trained), "--data", str(la_root), "--list", str(list_file), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["per_case"]) == set(ids) and report["n_cases"] == 3
    for m in report["per_case"].values():
        assert set(METRICS) <= set(m) and all(np.isfinite(m[k]) for k in METRICS)
    assert set(report["mean"]) == set(METRICS)
    assert report["mean"]["dice"] == pytest.approx(np.mean([report["per_case"][i]["dice"] for i in ids]))
    assert json.loads(capsys.readouterr().out) == report["mean"]  # with --out, the means go to stdout
    # without --list every case is scored; without --out the whole report is printed
    assert main(["evaluate", str(trained), "--data", str(la_root)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_cases"] == 8 and set(printed["per_case"]) == {f"synth{k:03d}" for k in range(8)}


def _png_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask * 255).astype(np.uint8)).save(path)


def test_evaluate_mask_folders(tmp_path, capsys):
    cases = make_synthetic_dataset(3, dims=2, shape=(32, 32))
    for c in cases:
        _png_mask(tmp_path / "gt" / f"{c.id}.png", c.label)
    _png_mask(tmp_path / "pred" / "synth000.png", cases[0].label)  # perfect
    _png_mask(tmp_path / "pred" / "synth001.png", np.roll(cases[1].label, 3, axis=0))  # shifted
    _png_mask(tmp_path / "pred" / "synth002.png", np.zeros((32, 32), np.int64))  # missed
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 0
    report = json.loads(capsys.readouterr().out)
    pc = report["per_case"]
    assert set(pc) == {"synth000", "synth001", "synth002"}
    assert pc["synth000"]["dice"] == 1.0 and pc["synth000"]["hd95"] == 0.0
    assert 0 < pc["synth001"]["dice"] < 1 and pc["synth001"]["hd95"] > 0
    assert pc["synth002"]["dice"] == 0.0
    assert set(report["mean"]) == set(METRICS)
    assert report["mean"]["jaccard"] == pytest.approx(np.mean([pc[k]["jaccard"] for k in pc]))
    # a ground-truth case without prediction is an error naming the prediction folder
    (tmp_path / "pred" / "synth002.png").unlink()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    _one_error_line(capsys, tmp_path / "pred", "synth002")


def test_predict_writes_masks_in_the_inputs_format(trained, la_root, tmp_path, capsys):
    out = tmp_path / "masks"
    h5_input = la_root / "synth003" / "mri_norm2.h5"
    vol = write_synthetic_dataset(tmp_path / "vol", 1, dims=3, shape=(16, 16, 12), fmt="volumes")
    nii_input = vol / "images" / "synth000.nii.gz"
    assert main(["predict", str(trained), str(h5_input), str(nii_input), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted([str(out / "synth003.h5"), str(out / "synth000.nii.gz")])
    with h5py.File(out / "synth003.h5", "r") as f, h5py.File(h5_input, "r") as src:
        mask = f["label"][()]
        assert mask.shape == src["image"].shape == (16, 16, 16)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    nii, src = nib.load(str(out / "synth000.nii.gz")), nib.load(str(nii_input))
    assert nii.shape == src.shape == (16, 16, 12)
    assert np.allclose(nii.affine, src.affine)
    assert set(np.unique(np.asarray(nii.dataobj))) <= {0, 1}

    # never overwrite: a second predict into the same folder skips the finished case and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["predict", str(trained), str(h5_input), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "0 case(s) segmented, 1 skipped" in captured.err and "--overwrite" in captured.err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # --overwrite redoes it (same mask: inference is deterministic)
    assert main(["predict", str(trained), str(h5_input), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert capsys.readouterr().out.split() == [str(out / "synth003.h5")]
    with h5py.File(out / "synth003.h5", "r") as f:
        assert np.array_equal(f["label"][()], mask)


def test_predict_continues_an_interrupted_folder_and_writes_extras(trained, tmp_path, capsys):
    from PIL import Image

    vol = write_synthetic_dataset(tmp_path / "vol", 3, dims=3, shape=(16, 16, 12), fmt="volumes")
    images = sorted((vol / "images").iterdir())
    out = tmp_path / "masks"
    assert main(["predict", str(trained), str(images[0]), "--out", str(out), "--no-progress"]) == 0
    first_mask = (out / "synth000.nii.gz").stat().st_mtime_ns
    dead, live = out / f".tmp-{2 ** 22 + 1}-synth001.nii.gz", out / ".tmp-1-synth002.nii.gz"  # pid 1: alive
    for torn in (dead, live):  # what a killed writer could leave (and one still writing): not finished masks
        torn.write_bytes(b"torn")
    capsys.readouterr()
    assert main(["predict", str(trained), str(vol / "images"), "--out", str(out), "--save-probabilities",
                 "--preview", "--no-progress"]) == 0
    captured = capsys.readouterr()
    # the case whose mask existed gets the extras asked for now; its mask is kept as it was
    assert "2 case(s) segmented, extras added for 1 whose mask existed" in captured.err
    assert (out / "synth000.nii.gz").stat().st_mtime_ns == first_mask
    assert str(out / "synth000_probability.nii.gz") in captured.out.split()
    assert not dead.exists() and live.exists()  # a killed predict's temp file is cleaned, a live one's kept
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == sorted(f"synth00{k}{s}" for k in (0, 1, 2)
                           for s in (".nii.gz", "_probability.nii.gz", "_preview.png"))
    # every requested output there: a re-run skips every case
    assert main(["predict", str(trained), str(vol / "images"), "--out", str(out), "--save-probabilities",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "0 case(s) segmented, 3 skipped" in captured.err
    prob = nib.load(str(out / "synth001_probability.nii.gz"))
    mask = np.asarray(nib.load(str(out / "synth001.nii.gz")).dataobj)
    p = np.asarray(prob.dataobj)
    assert prob.shape == mask.shape and p.dtype == np.float32 and ((p > 0.5) == (mask == 1)).all()
    preview = np.asarray(Image.open(out / "synth001_preview.png"))
    assert preview.ndim == 3 and preview.std() > 0  # a picture, not a blank


def test_predict_refuses_a_wrong_channel_count_and_an_unusable_out_before_any_work(trained, tmp_path, capsys):
    from PIL import Image

    rgb = tmp_path / "in" / "photo.png"
    rgb.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(rgb)
    out = tmp_path / "masks"
    assert main(["predict", str(trained), str(rgb), "--out", str(out)]) == 2
    _one_error_line(capsys, "photo.png", "channel")
    assert not out.exists()  # nothing created, nothing half-written
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["predict", str(trained), str(rgb), "--out", str(afile)]) == 2
    _one_error_line(capsys, "afile", "is a file")


def test_predict_a_folder_of_cases(trained, la_root, tmp_path, capsys):
    out = tmp_path / "masks"
    assert main(["predict", str(trained), str(la_root), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != STAMP) == [f"synth{k:03d}.h5" for k in range(8)]


# --------------------------------------------------------------------------------------- bad inputs
def _la_copy(tmp_path: Path, n: int = 4) -> Path:
    return write_synthetic_dataset(tmp_path / "LA", n, dims=3, shape=(16, 16, 16), fmt="la")


def _rewrite(path: Path, **datasets) -> None:
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f}
    data.update(datasets)
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)


def _train_fails(capsys, run: Path, overrides: list[str], *needles) -> str:
    assert main(_train_argv(run, overrides)) == 2
    line = _one_error_line(capsys, *needles)
    assert not run.exists(), "a run folder was created before the input was checked"
    return line


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", str(missing), "--out", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, missing)


def test_unknown_config_key(tmp_path, capsys):
    _train_fails(capsys, tmp_path / "run", ["train.stepz=3"], "train.stepz")


def test_data_root_missing(tmp_path, la_sets, capsys):
    root = tmp_path / "no-such-dir"
    _train_fails(capsys, tmp_path / "run", la_sets(root), root, "does not exist")


def test_empty_dataset_folder(tmp_path, la_sets, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    _train_fails(capsys, tmp_path / "run", la_sets(root), root)


def test_list_naming_a_missing_case(tmp_path, la_root, la_sets, capsys):
    list_file = tmp_path / "cases.list"
    list_file.write_text("synth000\nsynth001\nghost042\n")
    _train_fails(capsys, tmp_path / "run", la_sets(la_root, f"data.list={list_file}"), "ghost042", list_file)


def test_missing_list_file(tmp_path, la_root, la_sets, capsys):
    list_file = tmp_path / "nope.list"
    _train_fails(capsys, tmp_path / "run", la_sets(la_root, f"data.list={list_file}"), list_file)


@pytest.mark.parametrize(("labelled", "needles"), [
    (0, ["split.labelled: 0", "zero cases"]),
    (7, ["split.labelled: 7", "only 6"]),  # 8 cases, 2 for validation: 6 training cases
    (99, ["split.labelled: 99", "only 6"]),
])
def test_labelled_count_out_of_range(tmp_path, la_root, la_sets, capsys, labelled, needles):
    _train_fails(capsys, tmp_path / "run", la_sets(la_root, f"split.labelled={labelled}"), *needles)


def test_every_training_case_labelled_is_fine(tmp_path, la_root, la_sets):
    assert main(_train_argv(tmp_path / "run", la_sets(la_root, "split.labelled=6", "train.steps=1"))) == 0


def test_image_with_nan(tmp_path, la_sets, capsys):
    root = _la_copy(tmp_path)
    bad = root / "synth002" / "mri_norm2.h5"
    with h5py.File(bad, "r") as f:
        image = f["image"][()]
    image[3, 4, 5] = np.nan
    _rewrite(bad, image=image)
    _train_fails(capsys, tmp_path / "run", la_sets(root, "split.val=1", "split.labelled=3"), bad, "NaN")


def test_image_label_shape_mismatch(tmp_path, la_sets, capsys):
    root = _la_copy(tmp_path)
    bad = root / "synth001" / "mri_norm2.h5"
    _rewrite(bad, label=np.zeros((16, 16, 15), np.uint8))
    _train_fails(capsys, tmp_path / "run", la_sets(root, "split.val=1", "split.labelled=3"), bad,
                 "(16, 16, 15)", "(16, 16, 16)")


def test_label_value_out_of_range(tmp_path, la_sets, capsys):
    root = _la_copy(tmp_path)
    bad = root / "synth000" / "mri_norm2.h5"
    with h5py.File(bad, "r") as f:
        label = f["label"][()]
    label[0, 0, 0] = 3
    _rewrite(bad, label=label)
    line = _train_fails(capsys, tmp_path / "run", la_sets(root, "split.val=1", "split.labelled=3"), bad, "3",
                        "data.num_classes=2")
    assert "binarize" not in line  # the hint names the config key, not an internal argument


def test_train_into_existing_non_empty_run(tmp_path, la_root, la_sets, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me\n")
    assert main(_train_argv(run, la_sets(la_root))) == 2
    _one_error_line(capsys, run, "not empty")
    assert [p.name for p in run.iterdir()] == ["notes.txt"] and (run / "notes.txt").read_text() == "keep me\n"


def test_resume_with_a_different_config(trained, la_root, la_sets, capsys):
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()}
    assert main([*_train_argv(trained, la_sets(la_root, "train.lr=0.5")), "--resume"]) == 2
    _one_error_line(capsys, trained, "train.lr")
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()} == before


def test_predict_with_missing_run_folder(tmp_path, la_root, capsys):
    missing = tmp_path / "no-run"
    h5_input = la_root / "synth000" / "mri_norm2.h5"
    assert main(["predict", str(missing), str(h5_input), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, missing)
    assert not (tmp_path / "out").exists()


def test_predict_missing_input_file(trained, tmp_path, capsys):
    missing = tmp_path / "nope.nii.gz"
    assert main(["predict", str(trained), str(missing), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, missing)


def test_evaluate_with_missing_run_folder_and_bad_arguments(tmp_path, la_root, capsys):
    missing = tmp_path / "no-run"
    assert main(["evaluate", str(missing), "--data", str(la_root)]) == 2
    _one_error_line(capsys, missing)
    assert main(["evaluate", "--pred", str(tmp_path)]) == 2
    _one_error_line(capsys, "--gt")


def _nii_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.int16), np.eye(4)), str(path))
    return path


def test_evaluate_folders_shape_mismatch_names_the_file(tmp_path, capsys):
    gt = np.zeros((8, 8, 8), np.int16)
    gt[2:5, 2:5, 2:5] = 1
    _nii_mask(tmp_path / "gt" / "a.nii.gz", gt)
    _nii_mask(tmp_path / "gt" / "b.nii.gz", gt)
    _nii_mask(tmp_path / "pred" / "a.nii.gz", gt)
    bad = _nii_mask(tmp_path / "pred" / "b.nii.gz", gt[:, :, :6])
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    _one_error_line(capsys, bad)


def test_evaluate_folders_negative_label_names_the_value(tmp_path, capsys):
    gt = np.zeros((8, 8, 8), np.int16)
    gt[2:5, 2:5, 2:5] = 1
    _nii_mask(tmp_path / "gt" / "a.nii.gz", gt)
    pred = gt.copy()
    pred[0, 0, 0] = -1
    bad = _nii_mask(tmp_path / "pred" / "a.nii.gz", pred)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    _one_error_line(capsys, bad, "-1")


def test_evaluate_folders_label_above_range_names_file_and_value(tmp_path, capsys):
    gt = np.zeros((8, 8, 8), np.int16)
    gt[2:5, 2:5, 2:5] = 1
    _nii_mask(tmp_path / "gt" / "a.nii.gz", gt)
    pred = gt.copy()
    pred[0, 0, 0] = 3
    bad = _nii_mask(tmp_path / "pred" / "a.nii.gz", pred)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    _one_error_line(capsys, bad, "3", "0..1")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--num-classes", "4"]) == 0


def test_evaluate_folders_num_classes_below_two(tmp_path, capsys):
    gt = np.zeros((8, 8, 8), np.int16)
    gt[2:5, 2:5, 2:5] = 1
    _nii_mask(tmp_path / "gt" / "a.nii.gz", gt)
    _nii_mask(tmp_path / "pred" / "a.nii.gz", gt)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--num-classes", "1"]) == 2
    line = _one_error_line(capsys)
    assert "num-classes" in line or "num_classes" in line


def _volumes_without_label(tmp_path: Path, n: int, missing: str) -> Path:
    root = write_synthetic_dataset(tmp_path / "vol", n, dims=3, shape=(16, 16, 12), fmt="volumes")
    (root / "labels" / f"{missing}.nii.gz").unlink()
    return root


def test_case_without_label_file_is_unlabelled(tmp_path, capsys):
    """A case without a label file joins the unlabelled pool (it could only fail as a labelled or validation
    case); a split that then leaves no labelled training case is one error line, before a run folder exists."""
    split = make_split([f"synth{k:03d}" for k in range(6)], labelled=2, val=1, seed=0)
    missing = split["labelled"][0]
    root = _volumes_without_label(tmp_path, 6, missing)
    overrides = ["data.format=volumes", f"data.root={root}", "data.dims=2", "split.val=1", "split.labelled=2",
                 "model.channels=[4, 8]", "train.steps=2", "train.patch=[16, 16]", "train.batch_size=2"]
    try:
        status = main(_train_argv(tmp_path / "run", overrides))
    except Exception as exc:  # the bug: a traceback instead of an InputError
        pytest.fail(f"uncaught {type(exc).__name__}: {exc}")
    assert status == 0
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert missing in split["unlabelled"] and missing not in split["labelled"] + split["val"]
    for k in range(6):
        (root / "labels" / f"synth{k:03d}.nii.gz").unlink(missing_ok=True)
    assert main(_train_argv(tmp_path / "run2", overrides)) == 2
    _one_error_line(capsys, "none of the 6 cases has a label file")
    assert not (tmp_path / "run2").exists()


def test_evaluate_run_on_a_case_without_label(trained, tmp_path, capsys):
    root = _volumes_without_label(tmp_path, 2, "synth001")
    assert main(["evaluate", str(trained), "--data", str(root), "--format", "volumes"]) == 2
    _one_error_line(capsys, "synth001")


def test_predict_refuses_inputs_with_the_same_case_id_before_writing(trained, tmp_path, capsys):
    a = write_synthetic_dataset(tmp_path / "a", 1, dims=3, shape=(16, 16, 12), fmt="volumes")
    b = write_synthetic_dataset(tmp_path / "b", 1, dims=3, shape=(16, 16, 12), fmt="volumes", seed=1)
    out = tmp_path / "masks"
    assert main(["predict", str(trained), str(a / "images" / "synth000.nii.gz"),
                 str(b / "images" / "synth000.nii.gz"), "--out", str(out)]) == 2
    _one_error_line(capsys, "synth000")
    assert not out.exists() or not any(out.iterdir()), "a mask was written before the input error"


def test_evaluate_refuses_an_unwritable_output_before_computing(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["evaluate", "--pred", str(tmp_path), "--gt", str(tmp_path), "--out", str(afile / "s.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "afile" in err[0] and "is a file" in err[0]


def test_evaluate_refuses_to_overwrite_its_output(tmp_path, capsys):
    out = tmp_path / "scores.json"
    out.write_text("{}")
    assert main(["evaluate", "--pred", str(tmp_path), "--gt", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scores.json" in err[0] and "exists" in err[0]
    assert out.read_text() == "{}"


# ------------------------------------------------------------------------------ predict folders and outputs
def _volumes(tmp_path: Path, n: int = 2, **kw) -> Path:
    return write_synthetic_dataset(tmp_path / "vol", n, dims=3, shape=(16, 16, 12), fmt="volumes", **kw)


def test_predict_refuses_a_folder_made_by_another_run_or_setting(trained, tmp_path, capsys):
    import shutil

    images = _volumes(tmp_path) / "images"
    out = tmp_path / "masks"
    assert main(["predict", str(trained), str(images), "--out", str(out), "--no-progress"]) == 0
    stamp = json.loads((out / STAMP).read_text())
    assert stamp["run"] == str(trained.resolve()) and stamp["predictor"] == "student"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = tmp_path / "other-run"
    shutil.copytree(trained, other)
    results = json.loads((trained / "results.json").read_text())
    checkpoint = "best" if results["checkpoint"] == "last" else "last"
    capsys.readouterr()
    for argv, needle in (([str(other)], "run"), ([str(trained), "--checkpoint", checkpoint], "checkpoint")):
        assert main(["predict", argv[0], str(images), "--out", str(out), "--no-progress", *argv[1:]]) == 2
        _one_error_line(capsys, out, needle, "--overwrite", "another --out")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    # --overwrite redoes the cases with the other run, and the stamp says so
    assert main(["predict", str(other), str(images), "--out", str(out), "--no-progress", "--overwrite"]) == 0
    assert json.loads((out / STAMP).read_text())["run"] == str(other.resolve())
    # masks that predict did not make (no stamp) are never taken for finished cases
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(out / "synth000.nii.gz", foreign / "synth000.nii.gz")
    capsys.readouterr()
    assert main(["predict", str(trained), str(images), "--out", str(foreign), "--no-progress"]) == 2
    _one_error_line(capsys, foreign, "synth000.nii.gz", "--overwrite")


def test_predict_threads_default_to_the_runs_and_follow_threads(trained, tmp_path):
    import torch

    images = _volumes(tmp_path, 1) / "images"
    torch.set_num_threads(2)  # the run was trained with train.threads=1
    assert main(["predict", str(trained), str(images), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert torch.get_num_threads() == 1
    assert main(["predict", str(trained), str(images), "--out", str(tmp_path / "b"), "--no-progress",
                 "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("flag", "value"), [("--samples", "0"), ("--ddim-steps", "0"), ("--threads", "0"),
                                             ("--samples", "-3")])
def test_predict_refuses_counts_below_one(trained, tmp_path, capsys, flag, value):
    images = _volumes(tmp_path, 1) / "images"
    assert main(["predict", str(trained), str(images), "--out", str(tmp_path / "m"), flag, value]) == 2
    _one_error_line(capsys, f"{flag} {value}", "positive")
    assert not (tmp_path / "m").exists()


def test_predict_writes_nii_for_nii_inputs(trained, tmp_path, capsys):
    vol = _volumes(tmp_path, 1)
    src = nib.load(str(vol / "images" / "synth000.nii.gz"))
    plain = tmp_path / "in" / "case7.nii"
    plain.parent.mkdir()
    nib.save(src, str(plain))
    out = tmp_path / "masks"
    assert main(["predict", str(trained), str(plain), "--out", str(out), "--save-probabilities",
                 "--no-progress"]) == 0
    assert sorted(capsys.readouterr().out.split()) == [str(out / "case7.nii"), str(out / "case7_probability.nii")]
    with open(out / "case7.nii", "rb") as f:
        assert f.read(2) != b"\x1f\x8b"  # not gzip-compressed
    assert nib.load(str(out / "case7.nii")).shape == src.shape


def test_evaluate_folders_ignores_predicts_own_extras(trained, tmp_path, capsys):
    vol = _volumes(tmp_path, 2)
    out = tmp_path / "masks"
    assert main(["predict", str(trained), str(vol / "images"), "--out", str(out), "--save-probabilities",
                 "--preview", "--no-progress"]) == 0
    (out / ".tmp-99-synth001.nii.gz").write_bytes(b"torn")  # a temp file is not a prediction either
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(out), "--gt", str(vol / "labels")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["unscored_predictions"] == []
    # a file that merely looks like an extra (no mask of its base id) is still reported
    _nii_mask(out / "ghost_probability.nii.gz", np.zeros((16, 16, 12), np.int16))
    assert main(["evaluate", "--pred", str(out), "--gt", str(vol / "labels")]) == 0
    captured = capsys.readouterr()
    assert "1 prediction(s)" in captured.err and "ghost_probability" in captured.err


@pytest.mark.parametrize("command", ["train", "predict", "export", "report"])
def test_an_impossible_out_is_one_line_before_any_work(trained, tmp_path, la_root, la_sets, capsys, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile / "sub"  # under a regular file: no folder can be made there, whoever we are
    argv = {"train": _train_argv(out, la_sets(la_root)),
            "predict": ["predict", str(trained), str(la_root / "synth000" / "mri_norm2.h5"), "--out", str(out)],
            "export": ["export", str(trained), "--out", str(out / "model.pt")],
            "report": ["report", str(trained), "--out", str(out / "report.html")]}[command]
    assert main(argv) == 2
    _one_error_line(capsys, "afile")
    assert afile.read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_predict_out_whose_parent_cannot_be_created(trained, la_root, capsys):
    out = Path("/proc/superdiffusion-no-such-dir/masks")
    assert main(["predict", str(trained), str(la_root / "synth000" / "mri_norm2.h5"), "--out", str(out)]) == 2
    _one_error_line(capsys, out, "cannot write")


# ---------------------------------------------------------------------------------------- help texts
def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    description = " ".join(out.split("positional arguments")[0].split("\n", 2)[-1].split())
    for command in _commands():
        assert command in description, (command, description)


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"superdiffusion {version('superdiffusion')}"


def test_evaluate_format_help_names_every_dataset_format(capsys):
    from superdiffusion.data.readers import FORMATS

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fmt in FORMATS:
        assert fmt in text.split("--format")[-1].split("--pred")[0], fmt


def test_evaluate_run_threads(trained, la_root, tmp_path, capsys):
    import torch

    one = tmp_path / "one.list"
    one.write_text("synth001\n")
    torch.set_num_threads(2)
    assert main(["evaluate", str(trained), "--data", str(la_root), "--list", str(one)]) == 0
    assert torch.get_num_threads() == 1  # the run's train.threads
    assert main(["evaluate", str(trained), "--data", str(la_root), "--list", str(one), "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    assert main(["evaluate", str(trained), "--data", str(la_root), "--threads", "0"]) == 2
    _one_error_line(capsys, "--threads 0")
