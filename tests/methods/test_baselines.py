"""Baselines (Mean Teacher, UA-MT, CPS, BCP): one step in 2D and 3D, gradient routing, EMA maths, learning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from superdiffusion.checkpoint import load_checkpoint
from superdiffusion.config import load_config
from superdiffusion.engine.run import check_config, train_run
from superdiffusion.errors import InputError
from superdiffusion.methods import METHODS
from superdiffusion.methods.base import forward_batch_stats, supervised_loss
from superdiffusion.methods.baselines import (
    BCP,
    CPS,
    UAMT,
    BCPPretrain,
    CPSPaper,
    MeanTeacher,
    box_mask,
    masked_dice_ce,
    sigmoid_ramp,
)
from superdiffusion.methods.supervised import Supervised

ALL = [MeanTeacher, UAMT, CPS, BCP]
TRAINED = {MeanTeacher: ("student.",), UAMT: ("student.",), BCP: ("student.",), CPS: ("net1.", "net2.")}


def build(cls, dims: int, k: int = 2):
    cfg = load_config(None, ["model.channels=[4, 8]", f"data.dims={dims}", f"data.num_classes={k}"])
    torch.manual_seed(0)
    return cls(cfg, dims=dims, in_channels=1, num_classes=k)


def tiny_batch(dims: int, k: int) -> dict:
    g = torch.Generator().manual_seed(1)
    s = (16, 16) if dims == 2 else (8, 8, 8)
    return {"image": torch.randn(2, 1, *s, generator=g), "label": torch.randint(0, k, (2, *s), generator=g),
            "unlabelled": torch.randn(3, 1, *s, generator=g)}


def test_registry():
    for name, cls in {"mean-teacher": MeanTeacher, "ua-mt": UAMT, "cps": CPS, "cps-paper": CPSPaper,
                      "bcp": BCP}.items():
        assert METHODS[name] is cls and cls.uses_unlabelled


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(("dims", "k"), [(2, 2), (3, 3)])
def test_step_gradients_reach_only_trained_nets(cls, dims, k):
    m = build(cls, dims, k).train()
    loss, logs = m.training_step(tiny_batch(dims, k), step=3, total_steps=10,
                                 generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and logs["loss"] == pytest.approx(loss.item())
    loss.backward()
    prefixes = TRAINED[cls]
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in m.named_parameters() if n.startswith(prefixes)}
    assert all(torch.isfinite(p.grad).all() for n, p in m.named_parameters() if n in with_grad)
    # the trainer's optimisers hold exactly the trained networks, one per network
    groups = m.optimizer_groups()
    assert len(groups) == len(prefixes)
    assert {id(p) for ps in groups.values() for p in ps} == {id(p) for n, p in m.named_parameters() if n in with_grad}


@pytest.mark.parametrize("cls", ALL)
def test_step_randomness_comes_from_the_generator_only(cls):
    """Same generator state -> same loss, whatever the global RNG; the teacher's buffers stay untouched."""
    m, batch = build(cls, 2).train(), tiny_batch(2, 2)
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("teacher.")}
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(m.training_step(batch, step=3, total_steps=10, generator=torch.Generator().manual_seed(7))[0])
    assert losses[0].item() == losses[1].item()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_mean_teacher_ema_update():
    m = build(MeanTeacher, 2)
    with torch.no_grad():  # make the student differ from its copy, parameters and BN statistics alike
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
        m.student(torch.randn(4, 1, 16, 16))
    old = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    student = m.student.state_dict()
    m.after_step(1000)  # past the warm-up: alpha = ema_decay
    d = m.ema_decay
    for k, v in m.teacher.state_dict().items():
        want = student[k] if k.endswith("num_batches_tracked") else d * old[k] + (1 - d) * student[k]
        assert torch.allclose(v, want, atol=1e-6), k
    assert not any(p.requires_grad for p in m.teacher.parameters())
    m.after_step(0)  # the official warm-up min(1 - 1/(step + 1), decay): the first update copies the student
    assert all(torch.allclose(v, student[k]) for k, v in m.teacher.state_dict().items())


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_teacher_pass_uses_batch_statistics_and_leaves_the_running_ones(norm):
    """The official teachers run in training mode: batch statistics, but their running statistics move by EMA
    only (and a net without buffers, instance norm, passes too)."""
    cfg = load_config(None, ["model.channels=[4, 8]", f"model.norm={norm}", "model.dropout=0.0"])
    torch.manual_seed(0)
    m = MeanTeacher(cfg, dims=2, in_channels=1, num_classes=2)
    x = torch.randn(4, 1, 16, 16)
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    out = forward_batch_stats(m.teacher, x)
    assert all(torch.equal(v, before[k]) for k, v in m.teacher.state_dict().items())
    assert torch.allclose(out, m.teacher(x), atol=1e-6)  # a plain training-mode pass (it moves the buffers)
    if norm == "batch":
        assert any(not torch.equal(v, before[k]) for k, v in m.teacher.state_dict().items())


def test_mean_teacher_consistency_waits_then_ramps_over_the_run():
    from superdiffusion.methods.baselines import UAMT, MeanTeacher

    mt = MeanTeacher.__new__(MeanTeacher)
    assert mt.consistency_weight(99, 3000) == 0.0  # SSL4MIS 2D: the first 1000 of 30000 iterations
    assert 0 < mt.consistency_weight(100, 3000) < mt.consistency_weight(2000, 3000) < mt.consistency == 0.1
    assert UAMT.__new__(UAMT).consistency_weight(0, 3000) > 0  # UA-MT's codes have no delay


def test_cps_pseudo_supervises_the_unlabelled_images_only(monkeypatch):
    """SSL4MIS's CPS (2D and 3D): the cross terms on `outputs[labeled_bs:]`; the paper's code: every image."""
    import types

    from superdiffusion.methods import baselines

    sizes = []

    def cross_entropy(logits, target):
        sizes.append(len(logits))
        return torch.nn.functional.cross_entropy(logits, target)

    monkeypatch.setattr(baselines, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    m = build(CPS, 2).train()
    batch = tiny_batch(2, 2)  # 2 labelled + 3 unlabelled
    m.training_step(batch, step=3, total_steps=10, generator=torch.Generator().manual_seed(0))
    assert sizes == [3, 3]
    sizes.clear()
    m.pseudo_on_labelled = True
    m.training_step(batch, step=3, total_steps=10, generator=torch.Generator().manual_seed(0))
    assert sizes == [5, 5]


def test_cps_networks_start_different_with_pytorchs_default_initialisation():
    """SSL4MIS's 2D CPS script creates both networks with `create_model()` alone (its Kaiming / Xavier helpers
    unused since commit 9a74d15): PyTorch's default, |w| <= 1 / sqrt(fan_in), two different draws."""
    m = build(CPS, 2)
    convs = [(a, b) for a, b in zip(m.net1.modules(), m.net2.modules(), strict=True)
             if isinstance(a, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert convs
    for a, b in convs:
        fan_in = torch.nn.init._calculate_fan_in_and_fan_out(a.weight)[0]
        for w in (a.weight, b.weight):
            assert w.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
        assert not torch.equal(a.weight, b.weight)


def test_cps_paper_weighs_every_image_1_5_from_the_first_step():
    """TorchSemiSeg's CPS: cps_weight 1.5 (VOC), unramped, cross terms on labelled and unlabelled predictions;
    SSL4MIS's port ramps 0.1 over the run."""
    paper, port = build(CPSPaper, 2).train(), build(CPS, 2).train()
    assert paper.pseudo_on_labelled and not port.pseudo_on_labelled
    for step in (0, 5, 10):
        _, logs = paper.training_step(tiny_batch(2, 2), step=step, total_steps=10,
                                      generator=torch.Generator().manual_seed(0))
        assert logs["w"] == 1.5
        assert logs["loss"] == pytest.approx(logs["sup"] + 1.5 * logs["cps"], rel=1e-6)
    _, logs = port.training_step(tiny_batch(2, 2), step=0, total_steps=10, generator=torch.Generator().manual_seed(0))
    assert logs["w"] == pytest.approx(0.1 * math.exp(-5))


def test_helpers():
    assert sigmoid_ramp(0, 10) == pytest.approx(math.exp(-5)) and sigmoid_ramp(10, 10) == 1.0
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    mask = box_mask((12, 9, 6), 2 / 3, g1)
    assert torch.equal(mask, box_mask((12, 9, 6), 2 / 3, g2)) and int((mask == 0).sum()) == 8 * 6 * 4
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = 50 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    region = torch.ones(2, 8, 8)
    region[:, :4] = 0
    assert masked_dice_ce(perfect, target, region) < 1e-3 < masked_dice_ce(-perfect, target, region)
    # over the batch, an image without foreground no longer costs a whole class's Dice
    empty = torch.zeros(2, 8, 8, dtype=torch.long)
    empty[0, :2] = 1
    slightly_wrong = 5 * torch.nn.functional.one_hot(empty, 2).permute(0, 3, 1, 2).float()
    slightly_wrong[1, 1, 0, 0], slightly_wrong[1, 0, 0, 0] = 5.0, 0.0  # one false-positive pixel in image 1
    per_image = masked_dice_ce(slightly_wrong, empty, torch.ones(2, 8, 8))
    batch = masked_dice_ce(slightly_wrong, empty, torch.ones(2, 8, 8), over_batch=True)
    assert per_image > 0.2 > 0.1 > batch
    # squared: BCP's ACDC DiceLoss with a mask (_dice_mask_loss: squared terms, smooth 1e-10, mean over classes)
    logits, region = torch.randn(2, 3, 8, 8), (torch.rand(2, 8, 8) > 0.3).float()
    p, onehot = torch.softmax(logits, 1), torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    theirs = torch.stack([1 - (2 * (p[:, i] * onehot[:, i] * region).sum() + 1e-10) /
                          ((p[:, i] ** 2 * region).sum() + (onehot[:, i] ** 2 * region).sum() + 1e-10)
                          for i in range(3)]).mean()
    ce = (torch.nn.functional.cross_entropy(logits, target, reduction="none") * region).sum() / region.sum()
    ours = masked_dice_ce(logits, target, region, 1e-10, over_batch=True, squared=True)
    assert ours.item() == pytest.approx((theirs + ce).item(), rel=1e-5)


def test_supervised_terms_take_the_dice_train_dice_names():
    """train.dice batch-squared is SSL4MIS's DiceLoss (per class over the whole batch, squared denominators, smooth
    1e-5, background included, mean over classes); every supervised term is 0.5 (Dice + CE), as in their scripts."""
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(3, 3, 8, 8, generator=g), torch.randint(0, 3, (3, 8, 8), generator=g)
    p, onehot = torch.softmax(logits, 1), torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float()
    theirs = torch.stack([1 - (2 * (p[:, i] * onehot[:, i]).sum() + 1e-5) /
                          ((p[:, i] ** 2).sum() + (onehot[:, i] ** 2).sum() + 1e-5) for i in range(3)]).mean()
    ce = torch.nn.functional.cross_entropy(logits, y)
    batch_cfg = load_config(None, ["train.dice=batch-squared"])
    assert supervised_loss(batch_cfg)(logits, y) == pytest.approx((theirs + ce).item(), rel=1e-5)
    per_image = torch.stack([1 - (2 * (p[b, i] * onehot[b, i]).sum() + 1e-5) /
                             (p[b, i].sum() + onehot[b, i].sum() + 1e-5) for b in range(3) for i in range(3)]).mean()
    assert supervised_loss(load_config(None, []))(logits, y) == pytest.approx((per_image + ce).item(), rel=1e-5)
    batch = {"image": torch.randn(3, 1, 16, 16, generator=g), "label": torch.randint(0, 2, (3, 16, 16), generator=g),
             "unlabelled": torch.randn(3, 1, 16, 16, generator=g)}
    for cls in (Supervised, MeanTeacher):
        m = cls(batch_cfg, dims=2, in_channels=1, num_classes=2).eval()
        net = m.net if cls is Supervised else m.student
        loss, logs = m.training_step(batch, step=0, total_steps=10, generator=torch.Generator().manual_seed(0))
        expected = 0.5 * supervised_loss(batch_cfg)(net(batch["image"]), batch["label"])
        assert (logs["loss"] if cls is Supervised else logs["sup"]) == pytest.approx(expected.item(), rel=1e-5)


# Measured validation Dice of the chosen predictor after these 30 steps (seeds 0 / 1 / 2): mean-teacher
# 0.62 / 0.59 / 0.59, ua-mt 0.62 / 0.59 / 0.59, cps 0.59 / 0.63 / 0.65, bcp 0.60 / 0.57 / 0.59
# (supervised 0.64 / 0.61 / 0.63; 30 steps are too few for the unlabelled terms to pay off).
DICE_FLOOR = 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mean-teacher", "ua-mt", "cps", "bcp"])
def test_learns_on_synthetic(tmp_path, name):
    cfg = load_config(None, [
        f"method={name}", "data.format=synthetic", "data.synthetic={cases: 16, shape: [32, 32], seed: 0}",
        "split.labelled=4", "split.val=4", "model.channels=[8, 16]", "train.patch=[32, 32]", "train.batch_size=4",
        "train.unlabelled_batch_size=4", "train.steps=30", "train.lr=0.01", "train.val_every=0",
        "train.ckpt_every=30", "train.threads=1"])
    results = train_run(cfg, tmp_path / name, progress=False)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())
              if "loss" in r]
    first = losses
    if name == "bcp":  # its self-training starts from the copy-paste stage: the loss fell there first
        first = [r["loss"] for r in map(json.loads, (tmp_path / name / "pretrain" / "log.jsonl").read_text()
                                         .splitlines()) if "loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(first[:5])
    assert results["val"][results["predictor"]]["mean"]["dice"]["mean"] > DICE_FLOOR


def _tiny_bcp_cfg(*, cases: int, steps: int, ckpt_every: int) -> dict:
    """BCP on synthetic 32x32 cases, 4 labelled, batches of 2 + 2, no validation during training."""
    return load_config(None, [
        "method=bcp", "data.format=synthetic", f"data.synthetic={{cases: {cases}, shape: [32, 32], seed: 0}}",
        "split.labelled=4", "split.val=2", "model.channels=[4, 8]", "train.patch=[32, 32]", "train.batch_size=2",
        "train.unlabelled_batch_size=2", f"train.steps={steps}", "train.val_every=0", f"train.ckpt_every={ckpt_every}",
        "train.threads=1"])


def test_bcp_pretrains_on_labelled_copy_paste_then_starts_its_teacher_from_it(tmp_path):
    """BCP's stage 1 runs in pretrain/ on labelled mixes (2D: a third of stage 2's steps, their ACDC code's 10000
    of 30000; 3D: 2/15 of them, their LA code); the EMA teacher starts from it."""
    cfg = _tiny_bcp_cfg(cases=12, steps=15, ckpt_every=15)
    train_run(cfg, tmp_path / "bcp", progress=False)
    stage_log = [json.loads(r) for r in (tmp_path / "bcp" / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stage_log if "loss" in r] == list(range(1, 6))  # round(15 * 10000 / 30000)
    # stage 2 went on with stage 1's optimiser state (their code loads it): Adam counted 5 + 15 steps
    adam = load_checkpoint(tmp_path / "bcp" / "checkpoints" / "last.pt")["optimizers"]["student"]
    assert {int(v["step"]) for v in adam["state"].values()} == {20}
    assert adam["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # its own poly schedule, ended
    assert BCP.pretrain_steps({"train": {"steps": 15}, "data": {"dims": 3}}) == 2  # round(15 * 2000 / 15000)
    m = BCP(cfg, dims=2, in_channels=1, num_classes=2)
    stage = m.stages()[0]
    assert stage.method.student is m.student and not getattr(stage.method, "uses_unlabelled", False)
    with torch.no_grad():
        m.student.first.conv.weight.add_(1.0)  # as if stage 1 had trained it
    m.after_stages()
    for t, s in zip(m.teacher.state_dict().values(), m.student.state_dict().values()):
        assert torch.equal(t, s)


def test_bcp_can_start_from_its_best_pretraining_step_as_their_code(tmp_path):
    """bcp.pretrain_checkpoint: best validates stage 1 (50 times; here each of its 5 steps) and self-training
    goes on from its best step's weights and optimiser state, as their code loads `best_model.pth`."""
    cfg = _tiny_bcp_cfg(cases=12, steps=15, ckpt_every=15)
    cfg["bcp"]["pretrain_checkpoint"] = "best"
    train_run(cfg, tmp_path / "bcp", progress=False)
    stage_log = [json.loads(r) for r in (tmp_path / "bcp" / "pretrain" / "log.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["val_dice_student"] for r in stage_log if "val_dice_student" in r}
    assert list(scores) == [1, 2, 3, 4, 5]
    best = max(scores, key=lambda k: (scores[k], -k))  # the first of equal scores: only a gain replaces best.pt
    adam = load_checkpoint(tmp_path / "bcp" / "checkpoints" / "last.pt")["optimizers"]["student"]
    assert {int(v["step"]) for v in adam["state"].values()} == {best + 15}
    with pytest.raises(InputError, match="bcp.pretrain_checkpoint"):
        check_config({**cfg, "bcp": {**cfg["bcp"], "pretrain_checkpoint": "first"}})


@pytest.mark.parametrize(("stage", "at_step"), [(BCPPretrain, 1), (BCP, 3)], ids=["in-pretraining", "in-self-training"])
def test_bcp_interrupted_and_resumed_ends_as_an_uninterrupted_run(tmp_path, interrupted_at, stage, at_step):
    """The carried optimiser state survives a stop anywhere: resumed runs end with the same weights and state."""
    cfg = _tiny_bcp_cfg(cases=10, steps=6, ckpt_every=1)
    train_run(cfg, tmp_path / "a", progress=False)
    with interrupted_at(stage, at_step), pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "b", progress=False)
    train_run(cfg, tmp_path / "b", resume=True, progress=False)
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in "ab")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    state_a, state_b = a["optimizers"]["student"]["state"], b["optimizers"]["student"]["state"]
    assert all(torch.equal(v["exp_avg"], state_b[k]["exp_avg"]) for k, v in state_a.items())


def test_bcp_pseudo_labels_keep_each_class_largest_component_and_a_fixed_ema():
    from superdiffusion.methods.baselines import largest_components

    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :3, :3] = 1  # 9 pixels: kept
    labels[0, 6:, 6:] = 1  # 4 pixels: dropped
    labels[0, 4, 4] = 2  # another class's only component: kept
    labels[1, 1, 1] = labels[1, 2, 2] = 1  # diagonal neighbours: one component (full connectivity)
    out = largest_components(labels)
    assert out[0, :3, :3].eq(1).all() and out[0, 6:, 6:].eq(0).all() and out[0, 4, 4] == 2
    assert torch.equal(out[1], labels[1])
    m = build(BCP, 2)
    m.teacher.load_state_dict(m.student.state_dict())
    with torch.no_grad():
        m.student.first.conv.weight.add_(1.0)
    before = m.teacher.first.conv.weight.clone()
    m.after_step(0)  # a warm-up would copy the student (decay 0 at step 0); BCP's code keeps 0.99
    assert torch.allclose(m.teacher.first.conv.weight, before + 0.01)


def test_bcp_largest_component_is_a_setting():
    """bcp.largest_component: false keeps every piece of the teacher's argmax (LA's slices cut the atrium's veins
    into separate pieces); true, their LargestCC, keeps the largest."""
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :3, :3] = labels[0, 6:, 6:] = 1
    m = build(BCP, 2)
    m.teacher = _Fixed(_sure(labels))
    assert m.pseudo_label(torch.zeros(1, 1, 8, 8))[0, 6:, 6:].eq(0).all()
    m.cfg["bcp"]["largest_component"] = False
    assert torch.equal(m.pseudo_label(torch.zeros(1, 1, 8, 8)), labels)


class _Fixed(torch.nn.Module):
    """A stand-in network that returns the given logits, one tensor per call in turn."""

    def __init__(self, *logits: torch.Tensor):
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.logits[(self.calls - 1) % len(self.logits)]


def _sure(labels: torch.Tensor) -> torch.Tensor:
    """Logits that put all mass on `labels`."""
    return 50 * torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()


def test_bcp_pretrain_mixes_labels_with_their_images():
    """Their code's halves: image a of the batch with a box of image b, and its label likewise. A prediction
    equal to that mixed label map scores ~0; the unmixed label map of a does not."""
    cfg = load_config(None, ["method=bcp", "model.channels=[4, 8]"])
    y = torch.zeros(4, 12, 12, dtype=torch.long)
    y[0, :6] = 1  # a = images 0-1, b = images 2-3
    y[3, :, :4] = 1
    mask = box_mask((12, 12), BCP.box_ratio, torch.Generator().manual_seed(0))
    mixed = (y[:2] * mask + y[2:] * (1 - mask)).long()

    def loss_of(labels: torch.Tensor) -> float:
        stage = BCPPretrain(cfg, student=_Fixed(_sure(labels)), dims=2, in_channels=1, num_classes=2)
        loss, _ = stage.training_step({"image": torch.randn(4, 1, 12, 12), "label": y}, step=0, total_steps=1,
                                      generator=torch.Generator().manual_seed(0))
        return float(loss)

    assert loss_of(mixed) < 1e-3 < loss_of(y[:2])


def test_bcp_self_training_mixes_each_half_once():
    """Their code: unlabelled half a with a box of labelled half a, labelled half b with a box of unlabelled
    half b, each against the mix of (pseudo-)labels; the teacher labels each unlabelled half in its own pass."""
    cfg = load_config(None, ["method=bcp", "model.channels=[4, 8]"])
    m = BCP(cfg, dims=2, in_channels=1, num_classes=2)
    y = torch.zeros(4, 12, 12, dtype=torch.long)
    y[0, :5] = 1
    y[3, :, 7:] = 1
    pseudo = torch.zeros(4, 12, 12, dtype=torch.long)
    pseudo[1, 2:6, 2:6] = 1  # one component each: the largest-component step keeps them
    pseudo[2, 6:, :] = 1
    mask = box_mask((12, 12), BCP.box_ratio, torch.Generator().manual_seed(0))
    m.teacher = _Fixed(_sure(pseudo[:2]), _sure(pseudo[2:]))
    target_u = (pseudo[:2] * mask + y[:2] * (1 - mask)).long()  # unlabelled a, labelled a's box
    target_l = (y[2:] * mask + pseudo[2:] * (1 - mask)).long()  # labelled b, unlabelled b's box

    def loss_of(first: torch.Tensor, second: torch.Tensor) -> float:
        m.teacher.calls, m.student = 0, _Fixed(_sure(first), _sure(second))
        batch = {"image": torch.randn(4, 1, 12, 12), "label": y, "unlabelled": torch.randn(4, 1, 12, 12)}
        loss, _ = m.training_step(batch, step=0, total_steps=1, generator=torch.Generator().manual_seed(0))
        assert m.teacher.calls == 2 and m.student.calls == 2
        return float(loss)

    assert loss_of(target_u, target_l) < 1e-3
    assert loss_of(target_l, target_u) > 0.1 and loss_of(pseudo[:2], y[2:]) > 0.1
