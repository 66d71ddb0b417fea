"""The pseudo-label monitor (engine/monitor.py): its scores, and that the withheld labels it holds never reach a
loss (the run's losses and weights are the same when they are replaced by noise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from superdiffusion.checkpoint import load_checkpoint
from superdiffusion.engine import monitor as monitor_module
from superdiffusion.engine.monitor import PseudoLabelMonitor, pseudo_label_scores
from superdiffusion.engine.run import train_run

FIXMATCH = ["method=fixmatch", "superdiffusion.ema=0.9", "superdiffusion.cps_loss=ce", "superdiffusion.confidence=0.6",
            "superdiffusion.unlabelled_view=photometric", "superdiffusion.labeller_mode=eval",
            "model.dropout=[0.1, 0.2]", "eval.monitor_pseudo_labels=12"]


def test_scores_are_pooled_foreground_dice_precision_recall_and_coverage():
    labels = torch.tensor([[[1, 1, 0, 0]]])  # (1, 1, 4): two foreground pixels
    fg = torch.tensor([[[0.9, 0.4, 0.7, 0.1]]])  # argmax: 1, 0, 1, 0; confident at 0.75: pixels 0 and 3
    scores = pseudo_label_scores(torch.stack([1 - fg, fg], 1), labels, threshold=0.75)
    assert scores["dice"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # tp 1 (pixel 0), fp 1 (2), fn 1 (1)
    assert scores["precision"] == scores["recall"] == pytest.approx(0.5)
    assert scores["coverage"] == pytest.approx(0.5)
    assert scores["dice_confident"] == pytest.approx(1.0)  # on pixels 0 and 3 the argmax is right


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_withheld_labels_never_reach_a_loss(tiny_cfg, tmp_path, monkeypatch):
    """A FixMatch run with the monitor on, then the same run with the monitor's labels replaced by noise: the same
    losses at every step and the same final weights; only the monitor's scores differ."""
    true_run = tmp_path / "true"
    train_run(tiny_cfg(*FIXMATCH), true_run, progress=False)
    real = PseudoLabelMonitor.from_config.__func__

    def noisy(cls, cfg, ids, *, threshold):
        made = real(cls, cfg, ids, threshold=threshold)
        made.labels = torch.randint(0, 2, made.labels.shape, generator=torch.Generator().manual_seed(1))
        return made

    monkeypatch.setattr(monitor_module.PseudoLabelMonitor, "from_config", classmethod(noisy))
    noise_run = tmp_path / "noise"
    train_run(tiny_cfg(*FIXMATCH), noise_run, progress=False)
    true_log, noise_log = _log(true_run), _log(noise_run)
    losses = [[(e["step"], e["loss"]) for e in log if "loss" in e] for log in (true_log, noise_log)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    for a, b in zip(load_checkpoint(true_run / "checkpoints/last.pt")["model"].values(),
                    load_checkpoint(noise_run / "checkpoints/last.pt")["model"].values(), strict=True):
        assert torch.equal(a, b)
    scores = [[e["pl_ema_dice"] for e in log if "pl_ema_dice" in e] for log in (true_log, noise_log)]
    assert len(scores[0]) == 2 and scores[0] != scores[1]
    assert {"pl_ema_precision", "pl_ema_recall", "pl_ema_coverage", "pl_ema_dice_confident"} <= set(true_log[-1]) | \
        {k for e in true_log for k in e}


def test_off_by_default_and_a_neutral_key(tiny_cfg, tmp_path):
    """Without eval.monitor_pseudo_labels no pseudo-label score is logged, and a run may resume with the key
    changed (it changes no number the run computes)."""
    run = tmp_path / "run"
    train_run(tiny_cfg(*FIXMATCH[:-1], "train.steps=3"), run, progress=False)
    assert not any(k.startswith("pl_") for e in _log(run) for k in e)
    train_run(tiny_cfg(*FIXMATCH[:-1], "train.steps=3", "eval.monitor_pseudo_labels=4"), run, resume=True,
              progress=False)


def test_superdiffusion_monitors_the_ema_and_the_teacher(tiny_cfg, tmp_path):
    run = tmp_path / "sd"
    cfg = tiny_cfg(*FIXMATCH, "method=superdiffusion", "superdiffusion.pretrain_steps=2", "superdiffusion.rounds=0",
                   "superdiffusion.student_target=consensus")
    train_run(cfg, run, progress=False)
    last = [e for e in _log(run) if "pl_ema_dice" in e][-1]
    assert {"pl_ema_dice", "pl_teacher_dice", "pl_consensus_dice"} <= set(last)
