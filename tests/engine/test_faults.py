"""Fault tests: SIGKILL inside a checkpoint write and at a random moment, a full disk during a save.

Each killed run is resumed and must end with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from superdiffusion import checkpoint as ckpt
from superdiffusion.checkpoint import CheckpointWriteError, load_checkpoint
from superdiffusion.cli.main import main
from superdiffusion.engine.run import train_run

STEPS = 12
SRC = str(Path(__file__).resolve().parents[2] / "src")

# Runs train_run in a child; with KILL_IN_SAVE=n the child SIGKILLs itself half-way through writing
# its n-th checkpoint (after some bytes of the temporary file are on disk, before any rename).
CHILD = r"""
import json, os, signal, sys, torch
from superdiffusion import checkpoint
from superdiffusion.engine.run import train_run
cfg, out, kill_in_save = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
saves = [0]
real_save = torch.save
def tearing_save(obj, f, *a, **k):
    saves[0] += 1
    if saves[0] == kill_in_save:
        f.write(b"\x80\x02half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
checkpoint.torch.save = tearing_save
train_run(cfg, out, progress=False)
"""


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, fallback=False)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def fault_cfg(tiny_cfg):
    return tiny_cfg(f"train.steps={STEPS}", "train.ckpt_every=2", "train.val_every=4", "train.threads=1")


@pytest.fixture
def reference(tmp_path, fault_cfg) -> Path:
    train_run(fault_cfg, tmp_path / "uninterrupted", progress=False)
    return tmp_path / "uninterrupted" / "checkpoints"


def child(cfg: dict, out: Path, kill_in_save: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), str(out), str(kill_in_save)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("kill_in_save", [1, 4])  # the very first checkpoint, and one with a .prev behind it
def test_kill_during_checkpoint_write_resumes_to_same_weights(tmp_path, fault_cfg, reference, kill_in_save):
    run = tmp_path / "killed"
    proc = child(fault_cfg, run, kill_in_save)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert list((run / "checkpoints").glob(".*.tmp-*")), "the kill must land inside a write"
    train_run(fault_cfg, run, resume=True, progress=False)
    assert_same_weights(reference / "last.pt", run / "checkpoints" / "last.pt")
    assert_same_weights(reference / "best.pt", run / "checkpoints" / "best.pt")


def test_kill_at_a_random_moment_resumes_to_same_weights(tmp_path, fault_cfg, reference):
    run = tmp_path / "killed"
    proc = child(fault_cfg, run)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not log.is_file():
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # somewhere in a step, a save or a validation
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    train_run(fault_cfg, run, resume=(run / "config.yaml").is_file(), progress=False)
    assert_same_weights(reference / "last.pt", run / "checkpoints" / "last.pt")


def test_full_disk_during_save_loses_nothing(tmp_path, fault_cfg, monkeypatch):
    run = tmp_path / "run"
    real_save, calls = torch.save, [0]

    def disk_full_on_third_save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", disk_full_on_third_save)
    with pytest.raises(CheckpointWriteError, match="previous checkpoints are intact"):
        train_run(fault_cfg, run, progress=False)
    ckpts = run / "checkpoints"
    assert not list(ckpts.glob(".*.tmp-*"))  # the partial temporary file is removed
    saved = {p.name: load_checkpoint(p, fallback=False)["step"] for p in ckpts.glob("*.pt")}
    assert saved and all(step >= 2 for step in saved.values())  # what was saved before still loads
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    train_run(fault_cfg, run, resume=True, progress=False)  # and the run can go on once there is space
    assert load_checkpoint(ckpts / "last.pt")["step"] == STEPS


def test_full_disk_is_one_error_line_from_the_cli(tmp_path, monkeypatch, capsys):
    def no_space(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    args = ["train", "demo", "--out", str(tmp_path / "run"), "--no-progress", "--set", "train.steps=2",
            "--set", "train.ckpt_every=1", "--set", "model.channels=[4, 8]", "--set", "train.threads=1",
            "--set", "data.synthetic={cases: 10, shape: [32, 32], seed: 0}", "--set", "train.patch=[32, 32]",
            "--set", "split.val=3", "--set", "split.labelled=3"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "No space left" in err[0]
