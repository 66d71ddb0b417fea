"""The shared trainer and a run folder: what a run writes, that it is never overwritten, that a killed
run resumes to the same weights, 3D runs, and that supervised training actually learns."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from superdiffusion.checkpoint import load_checkpoint, previous_path
from superdiffusion.data.pipeline import build_data
from superdiffusion.engine.run import train_run
from superdiffusion.engine.trainer import NonFiniteLossError, Trainer, build_optimizer, hash_seed, lr_factor
from superdiffusion.errors import InputError
from superdiffusion.methods import build_method
from superdiffusion.methods.supervised import Supervised

METRIC_KEYS = {"dice", "jaccard", "hd95", "asd"}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _train_lines(run: Path) -> list[dict]:
    return [r for r in _log(run) if "loss" in r]


def _assert_same_weights(a: Path, b: Path) -> None:
    ma, mb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert ma.keys() == mb.keys() and ma
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"weights differ: {k}"


# ------------------------------------------------------------------------------------------- layout
def test_supervised_run_writes_the_documented_layout(tmp_path, tiny_cfg):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    results = train_run(cfg, run, progress=False)

    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg
    split = json.loads((run / "split.json").read_text())
    assert len(split["labelled"]) == 3 and len(split["val"]) == 3 and len(split["unlabelled"]) == 4

    log = _log(run)
    train = [r for r in log if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and "lr" in r and "time" in r for r in train)
    val = [r for r in log if "val_dice_student" in r]
    assert [r["step"] for r in val] == [3, 6]  # val_every=3, and at the end
    assert all(0.0 <= r["val_dice_student"] <= 1.0 for r in val)

    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    last, best = run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt"
    assert load_checkpoint(last)["step"] == 6
    assert load_checkpoint(previous_path(last))["step"] in (4, 6)  # ckpt_every=2 (6 twice if best improved)
    assert load_checkpoint(best)["step"] in (3, 6)
    ck = load_checkpoint(last)
    assert json.loads(ck["config"]) == cfg and ck["method"] == "supervised"
    assert ck["in_channels"] == 1 and ck["num_classes"] == 2
    assert (run / "DONE").is_file()

    stored = json.loads((run / "results.json").read_text())
    assert stored == json.loads(json.dumps(results))
    assert stored["checkpoint"] == "best" and stored["checkpoint_rule"] == "best validation Dice"
    assert stored["predictor"] == "student" and stored["steps"] == 6 and stored["labelled_cases"] == 3
    assert stored["split"] == split
    student = stored["val"]["student"]
    assert set(student["per_case"]) == set(split["val"])
    for metrics in student["per_case"].values():
        assert METRIC_KEYS <= set(metrics) and all(math.isfinite(metrics[k]) for k in METRIC_KEYS)
    assert METRIC_KEYS <= set(student["mean"])
    assert all(math.isfinite(student["mean"][k]["mean"]) for k in METRIC_KEYS)
    assert np.isclose(student["mean"]["dice"]["mean"], np.mean([m["dice"] for m in student["per_case"].values()]))


def test_checkpoint_rule_last_and_no_validation(tmp_path, tiny_cfg):
    r = train_run(tiny_cfg("eval.checkpoint=last"), tmp_path / "a", progress=False)
    assert r["checkpoint"] == "last" and r["checkpoint_rule"] == "last step"
    r = train_run(tiny_cfg("split.val=0"), tmp_path / "b", progress=False)
    assert "val" not in r and r["checkpoint"] == "last" and r["predictor"] == "student"
    assert not (tmp_path / "b" / "checkpoints" / "best.pt").exists()


def test_predictor_first_is_chosen_without_validation(tmp_path, tiny_cfg):
    r = train_run(tiny_cfg("method=cps", "eval.checkpoint=last", "eval.predictor=first"), tmp_path / "a",
                  progress=False)
    assert r["predictor"] == "net1" and set(r["val"]) == {"net1", "net2", "ensemble"}  # all still reported


# ------------------------------------------------------------------------------------ never overwrite
def test_run_folder_is_never_overwritten(tmp_path, tiny_cfg):
    cfg = tiny_cfg("train.steps=2")
    run = tmp_path / "run"
    train_run(cfg, run, progress=False)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    with pytest.raises(InputError, match="exists and is not empty") as exc:
        train_run(cfg, run, progress=False)
    assert str(run) in str(exc.value)
    with pytest.raises(InputError, match=r"config differs.*train\.lr") as exc:
        train_run(tiny_cfg("train.steps=2", "train.lr=0.5"), run, resume=True, progress=False)
    assert str(run) in str(exc.value)
    with pytest.raises(InputError, match="nothing to resume"):
        train_run(cfg, tmp_path / "other", resume=True, progress=False)
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after == before

    # an existing but empty folder is fine for a new run
    (tmp_path / "empty").mkdir()
    train_run(cfg, tmp_path / "empty", progress=False)


def test_resume_of_a_finished_run_changes_no_weights(tmp_path, tiny_cfg):
    cfg = tiny_cfg("train.steps=4")
    run = tmp_path / "run"
    train_run(cfg, run, progress=False)
    before = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    r = train_run(cfg, run, resume=True, progress=False)
    assert r["steps"] == 4 and len(_train_lines(run)) == 4
    after = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------- resume
RESUME_STEPS = 30

SLOW_TRAIN = """
import json, sys, time
from superdiffusion.engine.run import train_run
from superdiffusion.methods.supervised import Supervised

real = Supervised.training_step
steps = json.loads(sys.argv[1])["train"]["steps"]

def slow(self, batch, *, step, **kw):  # same maths, only slower, so that the kill lands mid-run
    while step >= steps - 2:  # and never let the run finish before the parent's SIGKILL
        time.sleep(0.05)
    time.sleep(0.05)
    return real(self, batch, step=step, **kw)

Supervised.training_step = slow
train_run(json.loads(sys.argv[1]), sys.argv[2], progress=False)
"""


def _resume_cfg(tiny_cfg):
    return tiny_cfg(f"train.steps={RESUME_STEPS}", "train.ckpt_every=2", "train.val_every=5", "train.threads=1")


def test_killed_run_resumes_to_identical_weights(tmp_path, tiny_cfg):
    cfg = _resume_cfg(tiny_cfg)
    a, b = tmp_path / "a", tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, json.dumps(cfg), str(b)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = b / "checkpoints" / "last.pt"
    killed_at = None
    try:
        # (a) the same config without interruption, in-process while the subprocess imports torch
        ra = train_run(cfg, a, progress=False)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if last.exists():
                step = load_checkpoint(last)["step"]
                if step >= 2:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert killed_at is not None, f"the training subprocess ended before the kill: {err.decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    interrupted_step = load_checkpoint(last)["step"]
    assert 2 <= interrupted_step < RESUME_STEPS, "the kill must land mid-run"
    assert not (b / "DONE").exists() and not (b / "results.json").exists()

    # (b) resumed in-process from the killed run's last.pt
    rb = train_run(cfg, b, resume=True, progress=False)
    assert load_checkpoint(last)["step"] == RESUME_STEPS
    _assert_same_weights(a / "checkpoints" / "last.pt", last)
    _assert_same_weights(a / "checkpoints" / "best.pt", b / "checkpoints" / "best.pt")
    assert rb["val"] == ra["val"] and rb["split"] == ra["split"]
    # the resumed run's log continues after the checkpoint it resumed from
    steps_b = [r["step"] for r in _train_lines(b)]
    assert steps_b[-1] == RESUME_STEPS and interrupted_step + 1 in steps_b


def _count_steps(monkeypatch) -> list[int]:
    """The (0-based) steps that training_step runs from now on."""
    steps: list[int] = []
    real = Supervised.training_step

    def counting(self, batch, *, step, **kw):
        steps.append(step)
        return real(self, batch, step=step, **kw)

    monkeypatch.setattr(Supervised, "training_step", counting)
    return steps


def test_resume_falls_back_to_prev_when_last_is_corrupt(tmp_path, tiny_cfg, monkeypatch, interrupted_at, capsys):
    cfg = tiny_cfg("train.steps=8", "train.val_every=0")
    train_run(cfg, tmp_path / "a", progress=False)
    run = tmp_path / "b"
    with interrupted_at(Supervised, 5), pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, progress=False)
    last = run / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["step"] == 4 and load_checkpoint(previous_path(last))["step"] == 2
    last.write_bytes(last.read_bytes()[:100])  # e.g. a disk error after the rename
    steps = _count_steps(monkeypatch)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # one clean line on stderr, not a raw Python warning
        train_run(cfg, run, resume=True, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: resuming from the backup checkpoint {previous_path(last)}: ")
    assert str(last) in err[0] and "not a readable superdiffusion checkpoint" in err[0]
    assert steps == [2, 3, 4, 5, 6, 7]  # resumed after step 2, the .prev checkpoint
    _assert_same_weights(tmp_path / "a" / "checkpoints" / "last.pt", last)
    assert [r["step"] for r in _train_lines(run)][-6:] == [3, 4, 5, 6, 7, 8]


def _interrupted_at_step_5(tmp_path, tiny_cfg, interrupted_at) -> tuple[dict, Path]:
    """An 8-step run stopped inside step 5 (checkpoints every 2 steps): its config and folder."""
    cfg = tiny_cfg("train.steps=8", "train.val_every=0")
    run = tmp_path / "run"
    with interrupted_at(Supervised, 5), pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, progress=False)
    return cfg, run


def test_resume_uses_prev_when_last_is_missing(tmp_path, tiny_cfg, monkeypatch, interrupted_at, capsys):
    cfg, run = _interrupted_at_step_5(tmp_path, tiny_cfg, interrupted_at)
    last = run / "checkpoints" / "last.pt"
    assert load_checkpoint(previous_path(last))["step"] == 2
    last.unlink()  # a last.pt lost by other means (save_checkpoint itself never leaves this state)
    steps = _count_steps(monkeypatch)
    capsys.readouterr()
    train_run(cfg, run, resume=True, progress=False)
    assert steps == [2, 3, 4, 5, 6, 7]  # continued from last.prev.pt (step 2), not from scratch
    err = capsys.readouterr().err
    assert "resuming from the backup checkpoint" in err and "checkpoint not found" in err


def _slow_steps(monkeypatch, seconds: float) -> None:
    """Every supervised training step takes at least `seconds` (so wall times are measurable)."""
    real = Supervised.training_step

    def slow(self, batch, *, step, **kw):
        time.sleep(seconds)
        return real(self, batch, step=step, **kw)

    monkeypatch.setattr(Supervised, "training_step", slow)


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_a_resumed_runs_wall_time_counts_every_segment(tmp_path, tiny_cfg, monkeypatch, interrupted_at,
                                                        old_checkpoint):
    """results.json's wall_time_s is the training time of the whole run, not of its last segment alone
    (the bench's timing tables compare them); a checkpoint of an older version (no elapsed_s) still resumes."""
    from superdiffusion.checkpoint import save_checkpoint

    pause = 0.3
    _slow_steps(monkeypatch, pause)
    cfg, run = _interrupted_at_step_5(tmp_path, tiny_cfg, interrupted_at)
    last = run / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    assert payload["step"] == 4 and payload["elapsed_s"] >= 4 * pause  # steps 0..3 before the kill
    if old_checkpoint:
        payload.pop("elapsed_s")
        payload.pop("format")
        save_checkpoint(payload, last, keep_previous=False)
    t0 = time.perf_counter()
    results = train_run(cfg, run, resume=True, progress=False)
    segment = time.perf_counter() - t0  # steps 4..7, the final evaluation, and reading the data before them
    if old_checkpoint:
        assert results["wall_time_s"] <= segment + 0.1  # all it knows of: this segment
    else:  # this segment (less the data reading, far under the 1.2 s before the kill) plus the earlier one
        assert results["wall_time_s"] > segment + 0.1
        assert results["wall_time_s"] <= segment + payload["elapsed_s"] + 0.1
    assert json.loads((run / "results.json").read_text())["wall_time_s"] == results["wall_time_s"]
    assert load_checkpoint(last)["elapsed_s"] >= (4 if old_checkpoint else 8) * pause


def test_resume_tolerates_a_torn_log_line(tmp_path, tiny_cfg, interrupted_at):
    cfg, run = _interrupted_at_step_5(tmp_path, tiny_cfg, interrupted_at)
    log = run / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 6, "ti')  # the line being written when the process died
    train_run(cfg, run, resume=True, progress=False)
    assert [r["step"] for r in _train_lines(run)][-4:] == [5, 6, 7, 8]


def test_kill_after_an_improving_validation_keeps_the_best_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    """A kill between an improving validation (best.pt written) and the next last.pt must not let a later,
    worse validation replace best.pt after resume (the resumed run must know the best score)."""
    from superdiffusion.engine import trainer as T

    scores = {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.6}  # validation Dice by step: the best model is step 4's
    current = {}
    real_validation = T.Trainer.run_validation

    def validation(self, writer, log):
        current["step"] = self.step
        return real_validation(self, writer, log)

    monkeypatch.setattr(T.Trainer, "run_validation", validation)
    monkeypatch.setattr(T, "evaluate_cases",
                        lambda fn, cases, **kw: {c.id: {"dice": scores[current["step"]]} for c in cases})
    cfg = tiny_cfg("train.steps=8", "train.val_every=2", "train.ckpt_every=2")
    train_run(cfg, tmp_path / "a", progress=False)
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt")["step"] == 4

    def validation_then_killed(self, writer, log):
        improved = validation(self, writer, log)
        if self.step == 4:  # SIGKILL while validating is over and best.pt written, before anything else
            raise KeyboardInterrupt
        return improved

    run = tmp_path / "b"
    with monkeypatch.context() as m:
        m.setattr(T.Trainer, "run_validation", validation_then_killed)
        with pytest.raises(KeyboardInterrupt):
            train_run(cfg, run, progress=False)
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == 4
    train_run(cfg, run, resume=True, progress=False)
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == 4  # not replaced by step 6's worse model
    _assert_same_weights(tmp_path / "a" / "checkpoints" / "best.pt", run / "checkpoints" / "best.pt")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    real = Supervised.training_step

    def nan_at_4(self, batch, *, step, **kw):
        loss, logs = real(self, batch, step=step, **kw)
        return (loss * float("nan") if step == 4 else loss), logs

    monkeypatch.setattr(Supervised, "training_step", nan_at_4)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="step 4"):
        train_run(tiny_cfg(), run, progress=False)
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_an_earlier_pipeline_stage_draws_its_own_batches(tmp_path, tiny_cfg):
    """BCP's pre-training and its self-training (SuperDiffusion's pre-training and co-training) each draw their
    own batches: the same (seed, step) must not replay the earlier stage's in the final one."""
    cfg = tiny_cfg("method=mean-teacher")
    data = build_data(cfg)
    final, again, earlier = (Trainer(build_method(cfg, in_channels=data.in_channels), cfg, data, tmp_path / str(k),
                                     stage=stage, progress=False) for k, stage in enumerate((0, 0, 1)))
    for sampler in ("labelled", "unlabelled"):
        a, b, c = (getattr(t, sampler).batch(0, 4)["image"] for t in (final, again, earlier))
        assert torch.equal(a, b) and not torch.equal(a, c)
    seeds = [hash_seed(t.seed, 0, 0, *t.stage_key) for t in (final, again, earlier)]
    assert seeds[0] == seeds[1] == hash_seed(cfg["seed"], 0, 0) != seeds[2]  # the final stage's old draws kept
    pretrain = tiny_cfg("method=pretrain")  # label-free stage: every training image, no label
    data = build_data(pretrain)
    a, c = (Trainer(build_method(pretrain, in_channels=data.in_channels), pretrain, data, tmp_path / f"p{k}",
                    stage=k, progress=False).labelled.batch(0, 4)["image"] for k in (0, 1))
    assert not torch.equal(a, c)


def test_lr_factor_schedules():
    assert lr_factor(0, total=10, warmup=2, schedule="poly") == 0.5
    assert lr_factor(1, total=10, warmup=2, schedule="poly") == 1.0
    assert lr_factor(2, total=10, warmup=2, schedule="poly") == 1.0
    assert lr_factor(10, total=10, warmup=2, schedule="poly") == 0.0
    assert lr_factor(6, total=10, warmup=2, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(9, total=10, warmup=0, schedule="constant") == 1.0
    with pytest.raises(InputError, match="lr_schedule"):
        lr_factor(3, total=10, warmup=0, schedule="step")


def test_sgd_is_the_baselines_originals_plain_momentum():
    """UA-MT's, SSL4MIS's and BCP's optimiser: SGD, momentum 0.9, no Nesterov, the configured weight decay."""
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], {"optimizer": "sgd", "lr": 0.01, "weight_decay": 1e-4})
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and group["momentum"] == 0.9 and not group["nesterov"]
    assert group["lr"] == 0.01 and group["weight_decay"] == 1e-4


# ---------------------------------------------------------------------------------------------- 3D
def test_3d_supervised_run(tmp_path, tiny_cfg):
    cfg = tiny_cfg("data.synthetic={cases: 6, shape: [16, 16, 16], seed: 0}", "data.dims=3",
                   "train.patch=[16, 16, 16]", "split.labelled=2", "split.val=2", "train.steps=4",
                   "train.val_every=2")
    r = train_run(cfg, tmp_path / "run3d", progress=False)
    dice = r["val"]["student"]["mean"]["dice"]["mean"]
    assert isinstance(dice, float) and 0.0 <= dice <= 1.0
    assert all(METRIC_KEYS <= set(m) for m in r["val"]["student"]["per_case"].values())
    model = load_checkpoint(tmp_path / "run3d" / "checkpoints" / "last.pt")["model"]
    assert any(v.ndim == 5 for v in model.values())  # 3D convolutions


def test_training_validation_can_be_a_cheap_look(tmp_path, tiny_cfg, monkeypatch):
    """train.val_cases / val_overlap: validation during training reads the first cases at a coarse window overlap;
    the run's final evaluation still scores every validation case at eval.overlap."""
    import superdiffusion.engine.trainer as trainer_module

    seen = []
    real = trainer_module.evaluate_cases

    def spy(fn, cases, **kw):
        seen.append((len(cases), kw["overlap"]))
        return real(fn, cases, **kw)

    monkeypatch.setattr(trainer_module, "evaluate_cases", spy)
    cfg = tiny_cfg("data.synthetic={cases: 7, shape: [16, 16, 16], seed: 0}", "data.dims=3",
                   "train.patch=[16, 16, 16]", "split.labelled=2", "split.val=3", "train.steps=4",
                   "train.val_every=2", "train.val_cases=1", "train.val_overlap=0.25", "eval.overlap=0.5")
    r = train_run(cfg, tmp_path / "run", progress=False)
    assert seen == [(1, 0.25)] * 2  # two validations during training (steps 2 and 4), each one case at 0.25
    assert len(r["val"]["student"]["per_case"]) == 3  # the final evaluation: every case


def test_3d_volumes_through_a_2d_net(tmp_path, tiny_cfg):
    cfg = tiny_cfg("data.synthetic={cases: 6, shape: [16, 16, 12], seed: 0}", "data.dims=2",
                   "train.patch=[16, 16]", "split.labelled=2", "split.val=2", "train.steps=2")
    r = train_run(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= r["val"]["student"]["mean"]["dice"]["mean"] <= 1.0


def test_photometric_option_perturbs_the_labelled_crops(tmp_path, tiny_cfg):
    """train.photometric reaches the labelled stream: the same steps, other losses, same labels."""
    losses = {}
    for on in (False, True):
        cfg = tiny_cfg("train.steps=3", "train.val_every=0", f"train.photometric={str(on).lower()}")
        train_run(cfg, tmp_path / f"run-{on}", progress=False)
        losses[on] = [x["loss"] for x in _train_lines(tmp_path / f"run-{on}")]
    assert len(losses[True]) == len(losses[False]) == 3
    assert losses[True][0] != losses[False][0]  # same initial weights and crops: only intensities differ


# ----------------------------------------------------------------------------------------- learning
def test_supervised_training_learns(tmp_path, tiny_cfg):
    # 60 steps on 4 labelled 32x32 cases (3-level MONAI U-Net): the loss falls and validation Dice reaches ~0.54
    # (seed 0, measured); an all-foreground guess scores ~0.2, an untrained net ~0.
    cfg = tiny_cfg("data.synthetic={cases: 16, shape: [32, 32], seed: 0}", "split.labelled=4", "split.val=4",
                   "model.channels=[8, 16, 32]", "train.steps=60", "train.batch_size=4", "train.lr=0.003",
                   "train.val_every=60", "train.ckpt_every=60")
    r = train_run(cfg, tmp_path / "run", progress=False)
    losses = [x["loss"] for x in _train_lines(tmp_path / "run")]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])
    assert r["val"]["student"]["mean"]["dice"]["mean"] > 0.5


def test_run_from_an_earlier_version_resumes_and_loads(tmp_path, tiny_cfg):
    """A key added since a run was made takes its default: the run still resumes and predicts."""
    import yaml

    from superdiffusion.evaluation.predict import load_run

    cfg = tiny_cfg("train.steps=2")
    run = tmp_path / "run"
    train_run(cfg, run, progress=False)
    stored = yaml.safe_load((run / "config.yaml").read_text())
    del stored["train"]["hold_memory"]  # as written before that key existed
    (run / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    assert train_run(cfg, run, resume=True, progress=False)["steps"] == 2
    # it changes no number, so a run may resume with it switched; a key that does change them is refused
    assert train_run(tiny_cfg("train.steps=2", "train.hold_memory=true"), run, resume=True, progress=False)
    with pytest.raises(InputError, match=r"config differs.*train\.lr"):
        train_run(tiny_cfg("train.steps=2", "train.lr=0.5"), run, resume=True, progress=False)
    # a supervised run does not read the diffusion sections: changing them changes none of its numbers
    assert train_run(tiny_cfg("train.steps=2", "superdiffusion.cps_loss=ce"), run, resume=True, progress=False)
    assert load_run(run).cfg == cfg


def test_a_resumed_pipelines_wall_time_includes_its_finished_stages(tmp_path, tiny_cfg, monkeypatch, interrupted_at):
    """A pipeline killed in its final stage reloads its finished pre-training: that stage's time still counts."""
    from superdiffusion.methods.superdiffusion import CoTrain, Pretrain

    real = Pretrain.training_step

    def slow(self, batch, **kw):
        time.sleep(0.4)
        return real(self, batch, **kw)

    monkeypatch.setattr(Pretrain, "training_step", slow)
    cfg = tiny_cfg("method=superdiffusion", "superdiffusion.pretrain_steps=3", "train.steps=4", "train.val_every=0")
    run = tmp_path / "run"
    with interrupted_at(CoTrain, 3), pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, progress=False)
    assert (run / "pretrain" / "DONE").is_file()
    pretrain_s = load_checkpoint(run / "pretrain" / "checkpoints" / "last.pt")["elapsed_s"]
    assert pretrain_s >= 3 * 0.4
    final_s = load_checkpoint(run / "checkpoints" / "last.pt")["elapsed_s"]  # the final stage's steps 0, 1
    t0 = time.perf_counter()
    results = train_run(cfg, run, resume=True, progress=False)
    segment = time.perf_counter() - t0  # no pre-training in it: the finished stage is only reloaded
    assert segment + 0.1 < results["wall_time_s"] <= segment + pretrain_s + final_s + 0.1
