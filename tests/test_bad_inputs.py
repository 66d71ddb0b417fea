"""The bad-input suite: whatever a user feeds in (configs, list files, image files, arguments), the
answer is one `error:` line naming the file or value, exit status 2, and no training started.

Kinds covered here (more in tests/cli/test_cli.py and tests/data/test_readers.py): config keys, types and
values of every section, garbage YAML and non-mapping configs, list files with path-escaping ids or
garbage, corrupt image files of every format, unsupported file types, `--set` syntax, resume without a
run. Property-based (hypothesis) where the input space is open-ended.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from superdiffusion.cli.main import main
from superdiffusion.data.readers import discover, load_case
from superdiffusion.data.synthetic import write_synthetic_dataset
from superdiffusion.errors import InputError

TINY = ["--set", "model.channels=[4, 8]", "--set", "train.patch=[32, 32]", "--set", "train.steps=2",
        "--set", "data.synthetic={cases: 8, shape: [32, 32], seed: 0}", "--set", "split.val=2",
        "--set", "split.labelled=2"]


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


BAD_SETS = [  # (override, text the error must name)
    ("method=magic", "magic"),
    ("data.format=dicomdir", "dicomdir"),
    ("data.dims=4", "data.dims"),
    ("data.num_classes=1", "data.num_classes"),
    ("data.intensity=sqrt", "sqrt"),
    ("data.scale=[0.5]", "data.scale"),
    ("train.patch=[31, 31]", "train.patch"),
    ("train.patch=[32]", "train.patch"),
    ("train.steps=0", "train.steps"),
    ("train.batch_size=-1", "train.batch_size"),
    ("train.lr=-0.1", "train.lr"),
    ("train.optimizer=lbfgs", "lbfgs"),
    ("train.lr_schedule=zigzag", "zigzag"),
    ("train.dice=squares", "train.dice"),
    ("train.augment=heavy", "train.augment"),
    ("model.arch=ssl4mis", "model.arch"),  # with method superdiffusion: its teacher needs a timestep input
    ("train.unlabelled_batch_size=1", "bcp mixes the halves"),  # with method bcp
    ("eval.checkpoint=first", "eval.checkpoint"),
    ("diffusion.t_infer=5000", "diffusion.t_infer"),
    ("diffusion.schedule=quadratic", "quadratic"),
    ("diffusion.inference=magic", "magic"),
    ("split.labelled=0", "split.labelled"),
    ("split.labelled=1000", "split.labelled"),
    ("split.val=8", "split.val"),
    ("split.labelled=abc", "split.labelled"),
    ("superdiffusion.rounds=-1", "superdiffusion.rounds"),
    ("superdiffusion.student=vit", "vit"),
    ("train.nonsense=1", "train.nonsense"),
    ("train.val_cases=-1", "train.val_cases"),
    ("train.val_overlap=1.0", "train.val_overlap"),
    ("eval.overlap=-0.1", "eval.overlap"),
    ("train=3", "train"),
]


@pytest.mark.parametrize(("override", "needle"), BAD_SETS, ids=[o for o, _ in BAD_SETS])
def test_bad_config_values_are_one_line_before_training(tmp_path, capsys, override, needle):
    out = tmp_path / "run"
    method = ["--set", "method=superdiffusion"] if override.startswith(("superdiffusion", "diffusion", "model.arch")) \
        else ["--set", "method=bcp"] if override.startswith("train.unlabelled_batch_size") else []
    assert main(["train", "demo", "--out", str(out), *TINY, *method, "--set", override]) == 2
    one_error_line(capsys, needle)
    assert not (out / "log.jsonl").exists()  # refused before any step


@pytest.mark.parametrize("text", ["[1, 2, 3]", "just a string", "a: [unclosed", "{train: {steps: }"])
def test_garbage_config_files(tmp_path, capsys, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=string.printable, max_size=60))
def test_any_set_string_is_a_clean_answer(tmp_path, capsys, text):
    """Random `--set` strings: either accepted (then a valid config) or one error line; never a traceback."""
    from superdiffusion.config import load_config
    from superdiffusion.engine.run import check_config

    try:
        check_config(load_config("demo", [text]))
    except InputError as err:
        assert "\n" not in str(err)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_garbage_config_bytes(tmp_path, capsys, data):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(data)
    code = main(["train", str(path), "--out", str(tmp_path / "never"), *TINY, "--set", "train.steps=0"])
    assert code == 2  # garbage, or (if it parses to nothing) the steps=0 refusal: always a clean error
    one_error_line(capsys)


@pytest.fixture
def la_dir(tmp_path) -> Path:
    return write_synthetic_dataset(tmp_path / "LA", 4, dims=3, shape=(16, 16, 8), seed=0, fmt="la")


@pytest.mark.parametrize("bad_id", ["../../etc", "a/b", "..", "~root"])
def test_list_ids_cannot_escape_the_root(la_dir, tmp_path, bad_id):
    lst = tmp_path / "escape.list"
    lst.write_text(f"{bad_id}\n")
    with pytest.raises(InputError, match="is a path"):
        discover("la", la_dir, lst)


def test_relative_list_path_cannot_escape_the_root(la_dir, tmp_path, monkeypatch):
    (tmp_path / "outside.list").write_text("synth000\n")
    monkeypatch.chdir(la_dir)  # "../outside.list" resolves from the cwd first: that is the user's own path
    assert [r.id for r in discover("la", la_dir, "../outside.list")] == ["synth000"]
    monkeypatch.chdir(tmp_path / "LA" / "synth000")  # now only root/../outside.list would find it
    with pytest.raises(InputError, match="inside the data root"):
        discover("la", la_dir, "../outside.list")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=400))
def test_corrupt_image_bytes_of_every_format(tmp_path, data):
    """Random bytes under each supported suffix: InputError naming the file, never another exception."""
    from superdiffusion.data.pipeline import ref_for_file

    for suffix in (".h5", ".nii.gz", ".nii", ".nrrd", ".png", ".bmp", ".tif", ".jpg"):
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(data)
        try:
            load_case(ref_for_file(path), with_label=False)
        except InputError as err:
            assert "junk" in str(err) and "\n" not in str(err)


def test_unsupported_file_type_for_predict(tmp_path, capsys):
    junk = tmp_path / "scan.dcm"
    junk.write_bytes(b"DICM")
    run = tmp_path / "run"
    run.mkdir()
    assert main(["predict", str(run), str(junk), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys)


def test_set_without_equals_and_resume_without_run(tmp_path, capsys):
    assert main(["train", "demo", "--set", "train.steps"]) == 2
    one_error_line(capsys, "train.steps")
    assert main(["train", "demo", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    one_error_line(capsys, "nothing to resume")
