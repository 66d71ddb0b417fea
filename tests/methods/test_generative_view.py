"""The generative strong view (superdiffusion.generative_view): the student learns the EMA's label of each unlabelled
image on the teacher's image-pathway re-synthesis of it (SDEdit-style, conditioned on that soft label), and the image
pathway keeps learning to denoise the labelled images conditioned on their labels."""

from __future__ import annotations

import pytest
import torch
from conftest import cotrain_batch, cotrain_method, reached_by

from superdiffusion.config import load_config
from superdiffusion.errors import InputError
from superdiffusion.methods import build_method
from superdiffusion.methods.superdiffusion import CoTrain

PATH = ["model.channels=[4, 8]", "train.patch=[32, 32]", "model.norm=instance", "model.dropout=0.0",
        "superdiffusion.ema=0.9", "superdiffusion.cps_loss=ce", "superdiffusion.confidence=0.6",
        "superdiffusion.labeller_mode=eval", "superdiffusion.rounds=0", "superdiffusion.student_target=ema",
        "superdiffusion.unlabelled_view=photometric", "superdiffusion.generative_view=300"]


def _method(*overrides: str) -> CoTrain:
    return cotrain_method(PATH, *overrides)






def test_the_image_pathway_learns_as_a_denoiser_and_the_student_from_its_view():
    m = _method()
    m.train()
    terms = m.losses(cotrain_batch(), step=0, total_steps=4, generator=torch.Generator().manual_seed(1))
    assert set(terms) == {"sup", "cps", "gen"}
    assert reached_by(m, terms["gen"]) == {"image_net"}  # the denoising term: the image pathway alone
    assert "student" in reached_by(m, terms["cps"])  # the view is made without a graph: it teaches, it does not learn
    assert "image_net" not in reached_by(m, terms["cps"])
    loss, logs = m.training_step(cotrain_batch(), step=0, total_steps=4, generator=torch.Generator().manual_seed(1))
    assert "gen" in logs and torch.isfinite(loss)


def test_the_view_reaches_the_student(monkeypatch):
    """Same weights: the student's unlabelled term differs with the generative view on, so the option can change the
    reported predictor. The control makes the view's random draw and returns the image unchanged: then the term is
    the plain one's, so the difference is the re-synthesis, not the shifted random stream. Off, no denoising term."""
    on = _method()
    off = _method("superdiffusion.generative_view=0")
    off.load_state_dict(on.state_dict())
    a = on.losses(cotrain_batch(), step=2, total_steps=4, generator=torch.Generator().manual_seed(5))["cps"]
    b = off.losses(cotrain_batch(), step=2, total_steps=4, generator=torch.Generator().manual_seed(5))
    assert "gen" not in b

    def identity_view(self, x, prob, generator):
        torch.randn(x.shape, generator=generator)  # the draw the re-synthesis makes
        return x

    monkeypatch.setattr(CoTrain, "resynthesised", identity_view)
    same = on.losses(cotrain_batch(), step=2, total_steps=4, generator=torch.Generator().manual_seed(5))["cps"]
    # the view drawn, the image returned: the plain term but for the draws after it (photometric view, passes)
    identity_off = _method("superdiffusion.generative_view=0")
    identity_off.load_state_dict(on.state_dict())
    g = torch.Generator().manual_seed(5)
    torch.randn(cotrain_batch()["unlabelled"].shape, generator=g)
    shifted = identity_off.losses(cotrain_batch(), step=2, total_steps=4, generator=g)["cps"]
    assert same.item() == pytest.approx(shifted.item(), rel=1e-5)
    assert a.item() != pytest.approx(same.item())


def test_resynthesis_departs_from_the_image_with_the_noise_level():
    """SDEdit's dial: from a low noise level the re-synthesis stays near the image, from a high one it departs."""
    m = _method()
    m.eval()
    x = cotrain_batch()["unlabelled"]
    prob = torch.softmax(torch.randn(4, 2, 32, 32, generator=torch.Generator().manual_seed(2)), 1)
    gaps = []
    for t in (10, 300, 900):
        m.cfg["superdiffusion"]["generative_view"] = t
        with torch.no_grad():
            view = m.resynthesised(x, prob, torch.Generator().manual_seed(0))
        assert view.shape == x.shape and view.min() >= -1 and view.max() <= 1
        gaps.append((view - x).abs().mean().item())
    assert gaps[0] < gaps[1] < gaps[2]


def test_trained_on_its_term_the_image_pathway_denoises_better():
    m = _method("model.channels=[8, 16]")
    opt = torch.optim.Adam(m.teacher.image_net.parameters(), lr=3e-3)
    m.train()
    batch = cotrain_batch()
    values = []
    for step in range(60):
        terms = m.losses(batch, step=step, total_steps=60, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        terms["gen"].backward()
        opt.step()
        values.append(terms["gen"].item())
    assert sum(values[-10:]) / 10 < 0.8 * sum(values[:10]) / 10


def test_generative_view_needs_an_ema_a_teacher_and_probabilities():
    with pytest.raises(InputError, match="generative_view"):
        _method("superdiffusion.ema=0", "superdiffusion.student_target=consensus")
    with pytest.raises(InputError, match="generative_view"):
        _method("superdiffusion.mask_condition=logits")
    with pytest.raises(InputError, match="timestep"):
        _method("superdiffusion.generative_view=1000")
    with pytest.raises(InputError, match="generative_view"):  # the control has no teacher to draw the view
        build_method(load_config(None, [*PATH, "method=fixmatch"]), in_channels=1)
