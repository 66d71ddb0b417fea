"""The `agree` target (issue 42 b): the student learns the EMA's label only where the teacher's argmax agrees with it,
nothing elsewhere, so the teacher can veto the EMA's errors without adding its own."""

from __future__ import annotations

import pytest
import torch
from conftest import cotrain_batch, cotrain_method

from superdiffusion.config import load_config
from superdiffusion.errors import InputError
from superdiffusion.methods import build_method
from superdiffusion.methods.superdiffusion import CoTrain, agreement

PATH = ["model.channels=[4, 8]", "train.patch=[32, 32]", "model.norm=instance", "model.dropout=0.0",
        "superdiffusion.ema=0.9", "superdiffusion.cps_loss=ce", "superdiffusion.confidence=0.6",
        "superdiffusion.labeller_mode=eval", "superdiffusion.rounds=0", "superdiffusion.student_target=agree",
        "superdiffusion.unlabelled_view=photometric"]


def _method(*overrides: str) -> CoTrain:
    return cotrain_method(PATH, *overrides)




def test_agreement_keeps_the_emas_label_where_both_argmaxes_agree():
    ema = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.4]])[None, :, :, None]  # (1, 2 classes, 3 pixels, 1)
    teacher = torch.tensor([[0.7, 0.7, 0.3], [0.3, 0.3, 0.7]])[None, :, :, None]
    out = agreement(ema, teacher)
    assert torch.equal(out[0, :, 0, 0], ema[0, :, 0, 0])  # both say background
    assert torch.equal(out[0, :, 1, 0], torch.tensor([0.5, 0.5]))  # they disagree: no label
    assert torch.equal(out[0, :, 2, 0], torch.tensor([0.5, 0.5]))


def test_agree_reaches_the_student_and_the_monitor():
    """Same weights, same draws: the student's unlabelled term differs from the EMA-only target's (the teacher's
    argmax vetoes pixels), so the option can change the reported predictor; the monitor scores the agreed labels."""
    agree, ema = _method(), _method("superdiffusion.student_target=ema")
    ema.load_state_dict(agree.state_dict())
    a = agree.losses(cotrain_batch(), step=2, total_steps=4, generator=torch.Generator().manual_seed(5))
    b = ema.losses(cotrain_batch(), step=2, total_steps=4, generator=torch.Generator().manual_seed(5))
    assert a["cps"].item() != pytest.approx(b["cps"].item())
    assert set(agree.pseudo_labellers()) == {"ema", "teacher", "agreement"}


def test_agree_needs_a_teacher_an_ema_and_a_masked_loss():
    with pytest.raises(InputError, match="EMA"):
        _method("superdiffusion.ema=0")
    with pytest.raises(InputError, match="vetoed pixels"):  # MONAI's Dice cannot leave pixels out
        _method("superdiffusion.cps_loss=dice", "superdiffusion.confidence=0.0")
    with pytest.raises(InputError, match="vetoed pixels"):
        _method("superdiffusion.confidence=0.0")
    with pytest.raises(InputError, match="agree reads the teacher"):
        build_method(load_config(None, [*PATH, "method=fixmatch"]), in_channels=1)
