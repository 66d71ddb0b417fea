"""UniMatch (its authors' medical code): the step's terms and weights, where its pseudo-labels come from, and that it
learns."""

from __future__ import annotations

import json

import pytest
import torch

from superdiffusion.config import load_config
from superdiffusion.engine.run import train_run
from superdiffusion.errors import InputError
from superdiffusion.methods.unimatch import UniMatch


def _unimatch(*overrides: str) -> UniMatch:
    torch.manual_seed(0)
    cfg = load_config(None, ["method=unimatch", "model.channels=[4, 8]", "model.norm=instance",
                             "model.dropout=[0.1, 0.2]", *overrides])
    return UniMatch(cfg, dims=2, in_channels=1, num_classes=2)


def test_step_combines_the_four_terms_and_reaches_the_net(monkeypatch):
    m = _unimatch()
    m.train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    modes = []
    real = m.net.forward
    monkeypatch.setattr(m.net, "forward", lambda v: modes.append((len(v), m.net.training)) or real(v))
    loss, logs = m.training_step({"image": x[:2], "label": (x[:2, 0] > 0).long(), "unlabelled": x[2:]}, step=0,
                                 total_steps=10, generator=torch.Generator().manual_seed(1))
    want = (logs["x"] + 0.25 * logs["s1"] + 0.25 * logs["s2"] + 0.5 * logs["fp"]) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert modes == [(2, False), (4, True)]  # the CutMix partners in evaluation mode; both strong views together
    assert m.net.training
    loss.backward()
    assert all(p.grad is not None for p in m.net.parameters())
    with pytest.raises(InputError, match="UniMatch"):
        _unimatch("model.arch=double-conv")


def test_the_trainer_draws_two_unlabelled_batches_and_it_learns(tiny_cfg, tmp_path, monkeypatch):
    """Two batches of train.unlabelled_batch_size (u and its CutMix partners); over a short run on synthetic data the
    labelled loss falls and validation Dice beats the untrained net's."""
    cfg = tiny_cfg("method=unimatch", "train.steps=40", "train.val_every=40", "train.unlabelled_batch_size=2",
                   "train.lr=0.01", "model.channels=[8, 16]")
    seen = []
    real = UniMatch.training_step
    monkeypatch.setattr(UniMatch, "training_step",
                        lambda self, batch, **kw: seen.append(len(batch["unlabelled"])) or real(self, batch, **kw))
    results = train_run(cfg, tmp_path / "run", progress=False)
    assert set(seen) == {4}
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    x = [e["x"] for e in log if "x" in e]
    assert sum(x[-10:]) < sum(x[:10])
    assert results["val"]["student"]["mean"]["dice"]["mean"] > 0.3
