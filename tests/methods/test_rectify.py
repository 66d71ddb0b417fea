"""Rectification (superdiffusion.rectify, DiffRect's idea): the teacher's mask pathway learns on the labelled images
to turn the EMA's noised soft label into the true one, then refines the EMA's labels of the unlabelled images, which
the student learns (student_target: rectified) after a warm-up."""

from __future__ import annotations

import pytest
import torch
from conftest import cotrain_batch, cotrain_method, reached_by

from superdiffusion.errors import InputError
from superdiffusion.methods.superdiffusion import CoTrain

PATH = ["model.channels=[4, 8]", "train.patch=[32, 32]", "model.norm=instance", "superdiffusion.ema=0.9",
        "superdiffusion.cps_loss=ce", "superdiffusion.confidence=0.6", "superdiffusion.labeller_mode=eval",
        "superdiffusion.rounds=0", "superdiffusion.rectify=300", "superdiffusion.student_target=rectified",
        "superdiffusion.rectify_after=0.5"]


def _method(*overrides: str) -> CoTrain:
    return cotrain_method(PATH, *overrides)






def test_rectifier_term_trains_the_mask_pathway_alone():
    m = _method()
    m.train()
    terms = m.losses(cotrain_batch(), step=0, total_steps=4, generator=torch.Generator().manual_seed(1))
    assert set(terms) == {"sup", "cps", "rect"}
    assert reached_by(m, terms["rect"]) == {"mask_net"}
    loss, logs = m.training_step(cotrain_batch(), step=0, total_steps=4, generator=torch.Generator().manual_seed(1))
    assert "rect" in logs
    off = _method("superdiffusion.rectify=0", "superdiffusion.student_target=ema")
    assert "rect" not in off.losses(cotrain_batch(), step=0, total_steps=4, generator=torch.Generator().manual_seed(1))


def test_student_learns_the_ema_labels_before_the_warm_up_and_the_rectified_ones_after():
    m = _method("model.dropout=0.0")
    m.train()
    batch = cotrain_batch()
    early = m.losses(batch, step=1, total_steps=4, generator=torch.Generator().manual_seed(5))  # 1 < 0.5 * 4
    ema = _method("model.dropout=0.0", "superdiffusion.student_target=ema")
    ema.load_state_dict(m.state_dict())
    ema.train()
    same = ema.losses(batch, step=1, total_steps=4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(early["cps"], same["cps"])  # before rectify_after: the EMA's labels
    late = m.losses(batch, step=2, total_steps=4, generator=torch.Generator().manual_seed(5))
    plain = ema.losses(batch, step=2, total_steps=4, generator=torch.Generator().manual_seed(5))
    assert late["cps"].item() != pytest.approx(plain["cps"].item())  # after it: another target
    m.eval()
    with torch.no_grad():  # the EMA's soft labels refined by the mask pathway: class probabilities
        prob = torch.softmax(m.ema(batch["unlabelled"]), 1)
        refined = m.rectified(batch["unlabelled"], prob, torch.Generator().manual_seed(0))
    assert refined.shape == prob.shape and torch.allclose(refined.sum(1), torch.ones(1))
    assert set(m.pseudo_labellers()) == {"ema", "teacher", "rectified"}


def test_rectify_needs_an_ema_and_a_teacher():
    with pytest.raises(InputError, match="rectify"):
        _method("superdiffusion.ema=0", "superdiffusion.student_target=consensus")
    with pytest.raises(InputError, match="rectified needs"):
        _method("superdiffusion.rectify=0")
    with pytest.raises(InputError, match="timestep"):
        _method("superdiffusion.rectify=1000")


def test_rectifier_learns_to_correct_a_corrupted_label():
    """Trained alone on its term, the mask pathway turns a corrupted soft label into one closer to the truth than
    the corrupted label itself (the point of rectification), on held-out images."""
    m = _method("model.channels=[8, 16]")
    opt = torch.optim.Adam(m.teacher.mask_net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def data(n: int):
        x = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
        y = (torch.nn.functional.avg_pool2d(x, 5, 1, 2)[:, 0] > 0.0).long()
        flip = torch.rand(y.shape, generator=g) < 0.15  # a labeller wrong on 15 % of the pixels
        noisy = torch.where(flip, 1 - y, y)
        return x, y, torch.nn.functional.one_hot(noisy, 2).movedim(-1, 1).float() * 0.8 + 0.1

    m.train()
    for _ in range(150):
        x, y, prob = data(8)
        t = torch.randint(0, 301, (8,), generator=g)
        loss = m.sup_loss(m.rectifier_logits(x, prob, t, torch.randn(prob.shape, generator=g)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x, y, prob = data(16)
    with torch.no_grad():
        refined = m.rectified(x, prob, torch.Generator().manual_seed(1))
    assert (refined.argmax(1) == y).float().mean() > (prob.argmax(1) == y).float().mean() + 0.03
