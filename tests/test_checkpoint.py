"""Checkpoints: exact round trip (tensors, RNG states), atomic writes with a previous copy, fallback on
corruption, and weights-only loading that refuses (and never runs) pickled code."""

from __future__ import annotations

import json
import os
import pickle
import random
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from superdiffusion.checkpoint import (
    FORMAT,
    config_of,
    load_checkpoint,
    previous_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from superdiffusion.config import DEFAULTS
from superdiffusion.errors import InputError


def _draws() -> tuple:
    """A few draws from every global RNG, including the cached-Gaussian paths of python and numpy."""
    return (random.random(), random.gauss(0, 1), random.getrandbits(64), np.random.standard_normal(3).tolist(),
            np.random.rand(), torch.rand(4).tolist(), torch.randn(2).tolist(), torch.randint(0, 10**6, (3,)).tolist())


def _payload(step: int = 3) -> dict:
    return {"step": step, "best": 0.25, "config": json.dumps({"seed": 1, "train": {"steps": 9}}),
            "model": {"w": torch.arange(12.0).reshape(3, 4) * step, "b": torch.tensor([1, 2, 3]),
                      "h": torch.randn(2, 2, dtype=torch.float64)},
            "nested": {"list": [1, 2.5, "x"], "none": None}}


def test_round_trip_tensors_and_plain_data(tmp_path):
    payload = _payload()
    path = save_checkpoint(payload, tmp_path / "sub" / "last.pt")
    assert path == tmp_path / "sub" / "last.pt" and path.is_file()
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT
    for k in ("step", "best", "config", "nested"):
        assert loaded[k] == payload[k]
    for k, v in payload["model"].items():
        assert torch.equal(loaded["model"][k], v) and loaded["model"][k].dtype == v.dtype
    cfg = config_of(loaded)  # completed to the current keys
    assert cfg["seed"] == 1 and cfg["train"]["steps"] == 9 and cfg["train"]["lr"] == DEFAULTS["train"]["lr"]
    # no temporary file is left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_rng_state_restores_torch_numpy_python_exactly(tmp_path):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.gauss(0, 1)  # leave a cached Gaussian in python's and numpy's state
    np.random.standard_normal()
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = _draws()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    assert _draws() != expected
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected


def test_rng_state_is_weights_only_loadable(tmp_path):
    path = tmp_path / "rng.pt"
    save_checkpoint({"rng": rng_state()}, path)
    torch.load(path, weights_only=True)  # the trainer's checkpoints must never need full unpickling


def test_atomic_write_keeps_previous(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_payload(1), path)
    assert not previous_path(path).exists()
    save_checkpoint(_payload(2), path)
    assert previous_path(path) == tmp_path / "last.prev.pt"
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(previous_path(path))["step"] == 1
    save_checkpoint(_payload(3), path)
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(previous_path(path))["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_keep_previous_false_writes_no_prev(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(_payload(1), path, keep_previous=False)
    save_checkpoint(_payload(2), path, keep_previous=False)
    assert load_checkpoint(path)["step"] == 2 and not previous_path(path).exists()


def test_failed_write_leaves_the_old_file_untouched(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_payload(1), path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError):
        save_checkpoint({"x": Unsaveable()}, path)
    assert load_checkpoint(path, fallback=False)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file, no prev shuffle


def test_truncated_checkpoint_falls_back_to_prev_with_one_clean_line(tmp_path, capsys):
    path = tmp_path / "last.pt"
    save_checkpoint(_payload(1), path)
    save_checkpoint(_payload(2), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a line on stderr, not a raw Python UserWarning
        loaded = load_checkpoint(path)
    assert loaded["step"] == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: using the backup checkpoint")
    assert str(previous_path(path)) in err[0] and str(path) in err[0]
    with pytest.raises(InputError, match="not a readable superdiffusion checkpoint") as exc:
        load_checkpoint(path, fallback=False)
    assert str(path) in str(exc.value) and len(str(exc.value).splitlines()) == 1
    lines = []
    assert load_checkpoint(path, action="resuming from", warn=lines.append)["step"] == 1
    assert lines == [f"warning: resuming from the backup checkpoint {previous_path(path)}: {exc.value}"]


@pytest.mark.parametrize("content", [b"\x00garbage" * 10, None])
def test_unreadable_checkpoint_error_is_one_complete_phrase(tmp_path, content):
    """torch's messages run on for lines (and a cut after 160 characters ended mid-word): the error gives the
    first complete sentence of the reason, or weights-only loading's own detail."""
    path = tmp_path / "last.pt"
    if content is None:  # a pickle of an object that weights-only loading refuses
        torch.save({"format": FORMAT, "x": Fraction(1, 2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: not a readable superdiffusion checkpoint (") and msg.endswith(")")
    reason = msg[msg.index("(") + 1:-1]
    assert len(reason) <= 160 and "\n" not in msg and "Please" not in reason and "In PyTorch" not in reason
    assert "weights-only unpickling failed: " in reason
    assert ("Fraction" in reason) if content is None else ("operand" in reason.lower())


def test_missing_checkpoint_falls_back_to_prev(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_payload(1), path)
    save_checkpoint(_payload(2), path)
    path.unlink()  # a crash between the two renames of save_checkpoint leaves only the .prev file
    lines = []
    assert load_checkpoint(path, warn=lines.append)["step"] == 1
    assert len(lines) == 1 and "checkpoint not found" in lines[0]


def test_corrupt_without_prev_is_input_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"\x00garbage" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback attempted, so no warning either
        with pytest.raises(InputError) as exc:
            load_checkpoint(path)
    assert str(path) in str(exc.value)
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


class _Payload:
    """Runs a shell command when unpickled (the classic malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _WritesFile:
    """Writes a file when unpickled, without a shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "pwned")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
@pytest.mark.parametrize("gadget", [_Payload, _WritesFile])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer, gadget):
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(gadget(armed)))  # the gadget really runs under ordinary unpickling
    assert armed.exists()
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    evil = {"format": FORMAT, "model": {"w": torch.zeros(2)}, "x": gadget(marker)}
    if writer == "torch":
        torch.save(evil, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(evil, f)
    assert not marker.exists()
    with pytest.raises(InputError) as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)
    assert not marker.exists(), "the pickled payload ran during load_checkpoint"


def test_malicious_last_with_good_prev_uses_prev_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    save_checkpoint(_payload(1), path)
    save_checkpoint(_payload(2), path)
    torch.save({"format": FORMAT, "x": _Payload(marker)}, path)
    lines = []
    assert load_checkpoint(path, warn=lines.append)["step"] == 1
    assert len(lines) == 1 and "backup checkpoint" in lines[0]
    assert not marker.exists()


def test_file_without_format_tag_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "step": 1}, path)
    with pytest.raises(InputError, match="format tag missing") as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "someone-elses-v9", "model": {}}, wrong)
    with pytest.raises(InputError, match="format tag missing"):
        load_checkpoint(wrong)
    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(3), bare)  # not even a dict
    with pytest.raises(InputError, match="format tag missing"):
        load_checkpoint(bare)


def test_config_of_an_earlier_version_gets_the_new_keys_at_their_defaults():
    old = json.loads(json.dumps(DEFAULTS))
    del old["superdiffusion"]["cps_loss"]
    assert config_of({"config": json.dumps(old)}) == DEFAULTS
    old["train"]["no_such_key"] = 1
    with pytest.raises(InputError, match="checkpoint config: unknown config key 'train.no_such_key'"):
        config_of({"config": json.dumps(old)})
