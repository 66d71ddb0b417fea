"""The teacher-less control (`fixmatch`): SuperDiffusion's co-training student path with the teacher left out, on
the same code, and SuperDiffusion's step making no teacher pass whose output nothing reads."""

from __future__ import annotations

import pytest
import torch

from superdiffusion.config import load_config
from superdiffusion.data.perturb import PhotometricView
from superdiffusion.errors import InputError
from superdiffusion.methods.superdiffusion import CoTrain, FixMatch, confident_argmax, masked_cross_entropy

# la2d's student path, on tiny nets
STUDENT_PATH = ["model.channels=[4, 8]", "train.patch=[32, 32]", "model.dropout=[0.1, 0.2]", "model.norm=instance",
                "superdiffusion.ema=0.9", "superdiffusion.cps_loss=ce", "superdiffusion.confidence=0.6",
                "superdiffusion.unlabelled_view=photometric", "superdiffusion.labeller_mode=eval",
                "superdiffusion.student_target=ema", "superdiffusion.rounds=0", "superdiffusion.teacher_every=2"]


def _method(cls, *overrides: str):
    torch.manual_seed(0)
    cfg = load_config(None, [*STUDENT_PATH, f"method={cls.name}", *overrides])
    return cls(cfg, dims=2, in_channels=1, num_classes=2)


def _batch():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    return {"image": x[:2], "label": (x[:2, 0] > 0.3).long(), "unlabelled": x[2:]}


def test_fixmatch_has_no_teacher():
    m = _method(FixMatch)
    assert m.teacher is None and set(m.optimizer_groups()) == {"student"}
    assert set(m.predictors()) == {"student", "ema"} and set(m.pseudo_labellers()) == {"ema"}
    assert m.step_cost < CoTrain.step_cost
    with pytest.raises(InputError, match="twin"):
        _method(FixMatch, "superdiffusion.student=twin", "superdiffusion.ema=0")


def test_fixmatch_loss_is_the_weak_to_strong_formula():
    """sup(student(x_l), y) + masked CE(student(strong view of x_u), confident argmax of the EMA on clean x_u, in
    evaluation mode): FixMatch with a Mean Teacher labeller (no dropout here, so the student's training passes can be
    replayed)."""
    m = _method(FixMatch, "model.dropout=0.0")
    m.train()
    batch = _batch()
    terms = m.losses(batch, step=1, total_steps=4, generator=torch.Generator().manual_seed(5))
    view = PhotometricView()(batch["unlabelled"], torch.Generator().manual_seed(5))
    m.eval()
    with torch.no_grad():
        target = confident_argmax(torch.softmax(m.ema(batch["unlabelled"]), 1), 0.6)
        want_sup = m.sup_loss(m.student(batch["image"]), batch["label"])
        want_cps = masked_cross_entropy(m.student(view), target)
    torch.testing.assert_close(terms["cps"], want_cps)
    torch.testing.assert_close(terms["sup"], want_sup)
    assert (target == -100).any() and (target != -100).any()  # the confidence mask is doing something


def test_superdiffusions_student_path_is_fixmatchs_code():
    """With the same student and EMA weights, SuperDiffusion's step on a step where the teacher does not learn gives
    the student exactly FixMatch's terms and gradient."""
    fm, sd = _method(FixMatch), _method(CoTrain)
    sd.student.load_state_dict(fm.student.state_dict())
    sd.ema.load_state_dict(fm.ema.state_dict())
    fm.train(), sd.train()
    batch, grads = _batch(), []
    for m in (fm, sd):
        torch.manual_seed(7)  # the same dropout masks
        terms = m.losses(batch, step=1, total_steps=4, generator=torch.Generator().manual_seed(5))
        grads.append(torch.autograd.grad(terms["sup"] + terms["cps"], list(m.student.parameters())))
        grads.append(terms)
    torch.testing.assert_close(grads[1]["cps"], grads[3]["cps"])
    for a, b in zip(grads[0], grads[2], strict=True):
        torch.testing.assert_close(a, b)


def test_no_teacher_pass_whose_output_nothing_reads(monkeypatch):
    """student_target ema without rounds: the teacher's pseudo-labels reach nothing, so on a step where it does not
    learn the teacher makes no pass at all; with consensus it labels the unlabelled images."""
    calls = []
    real = CoTrain.teacher_logits
    monkeypatch.setattr(CoTrain, "teacher_logits", lambda self, x, g=None: calls.append(len(x)) or real(self, x, g))
    batch = _batch()
    for target, want in (("ema", []), ("consensus", [4])):
        calls.clear()
        m = _method(CoTrain, f"superdiffusion.student_target={target}")
        m.train()
        m.losses(batch, step=1, total_steps=4, generator=torch.Generator().manual_seed(5))
        assert calls == want
    m = _method(CoTrain)
    m.train()
    calls.clear()
    m.losses(batch, step=2, total_steps=4, generator=torch.Generator().manual_seed(5))
    assert calls == [6]  # a learning step: one pass over labelled and unlabelled images, no labelling pass
