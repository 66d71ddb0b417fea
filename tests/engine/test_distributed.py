"""torchrun + DistributedDataParallel on CPU (gloo, 2 processes): every method trains, rank 0 alone
writes, validation metrics are gathered without duplicates, and a dying rank ends the whole job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from superdiffusion.engine import distributed

TINY = {
    "data": {"format": "synthetic", "synthetic": {"cases": 12, "shape": [32, 32], "seed": 0}},
    "split": {"labelled": 3, "val": 3},
    "model": {"channels": [4, 8]},
    "train": {"steps": 4, "batch_size": 2, "unlabelled_batch_size": 2, "patch": [32, 32], "val_every": 2,
              "ckpt_every": 2, "threads": 1},
    "superdiffusion": {"pretrain_steps": 2},
}


def torchrun(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUPERDIFFUSION_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "superdiffusion", "train", str(config), "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def write_config(tmp_path: Path, method: str, **train) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["method"] = method
    cfg["train"].update(train)
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("method", ["supervised", "superdiffusion", "mean-teacher", "ua-mt", "cps", "bcp"])
def test_two_process_training(tmp_path, method):
    out = tmp_path / "run"
    proc = torchrun(write_config(tmp_path, method), out)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in steps if "loss" in r]
    assert train_steps == [1, 2, 3, 4]  # rank 0 alone logs: each step once
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "DONE").is_file()
    results = json.loads((out / "results.json").read_text())
    per_case = results["val"][results["predictor"]]["per_case"]
    assert sorted(per_case) == sorted(results["split"]["val"])  # every case once, no padding duplicate


def test_shard_and_gather_cover_every_case_once():
    cases = [f"c{i}" for i in range(7)]
    shards = [distributed.shard(cases, r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == cases and not set(shards[0]) & set(shards[1])
    assert distributed.gather_dict({"a": 1}) == {"a": 1}  # single process: identity


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_dying_rank_ends_the_job(tmp_path):
    out = tmp_path / "run"
    proc = torchrun(write_config(tmp_path, "supervised", steps=100000, val_every=0, ckpt_every=1000), out)
    log = out / "log.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    killed_at = time.time()
    try:
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - killed_at < 90
