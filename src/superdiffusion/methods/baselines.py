"""Semi-supervised baselines on the shared trainer: Mean Teacher, UA-MT, CPS and BCP.

Hyper-parameters are class attributes holding the values of each method's official left-atrium (LA) code
(no config keys: subclass to change one). Ramps are per step over the whole run, as those scripts' ramps
span all their iterations (e.g. UA-MT: 40 "epochs" of 150 iterations = its 6000). Supervised terms are
0.5 (Dice + CE), as in those scripts, so the unlabelled weights keep their meaning. All randomness of a
step comes from the trainer's generator (noise drawn on CPU, then moved), so resumed runs are identical.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from .base import DICE_FORMS, Batch, Method, Stage, ema_update, forward_batch_stats, softmax_of, supervised_loss


def sigmoid_ramp(step: int, total_steps: int) -> float:
    """exp(-5 (1 - t)^2) with t = step / total_steps in [0, 1] (Laine & Aila; UA-MT's sigmoid_rampup)."""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def input_noise(x: Tensor, generator: torch.Generator, std: float = 0.1, clip: float = 0.2) -> Tensor:
    """UA-MT's teacher input noise clamp(N(0, std^2), -clip, clip), drawn on CPU from the generator."""
    return (torch.randn(x.shape, generator=generator) * std).clamp(-clip, clip).to(x)


class MeanTeacher(Method):
    """Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), as in UA-MT's LA code (Yu et al. 2019).

    Student: 0.5 (Dice + CE) on labels + w(t) * MSE(softmax student(x_u), softmax teacher(x_u + noise)),
    noise clamp(0.1 N(0, 1), -0.2, 0.2) on the teacher's input only; w(t) = consistency * exp(-5 (1 - t)^2),
    t = step / total_steps (ramp over the whole run), and 0 for the first consistency_delay of the run
    (SSL4MIS's 2D script: iterations 0-999 of 30000). Teacher: EMA of the student's parameters and
    floating buffers (BN statistics) with decay min(1 - 1 / (step + 1), ema_decay) (the official warm-up).
    Dropout (SSL4MIS's 2D U-Net: `model.dropout` per level, in the la2d protocol) perturbs student and teacher
    alike: the teacher also runs in training mode.
    """

    name = "mean-teacher"
    uses_unlabelled = True
    step_cost = 2.0
    ema_decay = 0.99
    consistency = 0.1
    consistency_delay = 1000 / 30000
    ema_warmup = True  # decay min(1 - 1 / (step + 1), ema_decay): the teacher starts as the true average

    def consistency_weight(self, step: int, total_steps: int) -> float:
        if step < self.consistency_delay * total_steps:
            return 0.0
        return self.consistency * sigmoid_ramp(step, total_steps)

    def __init__(self, cfg: dict, **kw):
        super().__init__(cfg, **kw)
        self.student = self.segmentation_net()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.dice_ce = supervised_loss(cfg)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"student": list(self.student.parameters())}

    def supervised(self, logits: Tensor, y: Tensor) -> Tensor:
        return 0.5 * self.dice_ce(logits, y)

    def consistency_loss(self, logits_u: Tensor, x_u: Tensor, *, step: int, total_steps: int,
                         generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        p_t = torch.softmax(forward_batch_stats(self.teacher, x_u + input_noise(x_u, generator)), 1)
        return ((torch.softmax(logits_u, 1) - p_t) ** 2).mean(), {}

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x_l, y, x_u = batch["image"], batch["label"], batch["unlabelled"]
        logits = self.student(torch.cat([x_l, x_u]))  # one batch, as the reference (shared BN statistics)
        sup = self.supervised(logits[:len(x_l)], y)
        cons, logs = self.consistency_loss(logits[len(x_l):], x_u, step=step, total_steps=total_steps,
                                           generator=generator)
        w = self.consistency_weight(step, total_steps)
        loss = sup + w * cons
        return loss, {"loss": loss.item(), "sup": sup.item(), "cons": cons.item(), "w": w, **logs}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student,
                   min(1 - 1 / (step + 1), self.ema_decay) if self.ema_warmup else self.ema_decay)

    def predictors(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"student": self.student, "teacher": self.teacher}

    def pseudo_labellers(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"teacher": softmax_of(self.teacher)}


class UAMT(MeanTeacher):
    """Uncertainty-aware mean teacher (Yu et al., MICCAI 2019), as its LA code.

    Mean Teacher whose consistency counts only voxels where the teacher is certain: the entropy of the
    mean softmax of `passes` (T = 8) noisy teacher passes must lie below (0.75 + 0.25 ramp(t)) ln K;
    consistency = sum(mask * MSE) / (K sum(mask)). Other values as MeanTeacher (consistency 0.1, EMA 0.99),
    but no consistency delay (neither its LA code nor SSL4MIS's 2D script has one).
    """

    name = "ua-mt"
    passes = 8
    consistency_delay = 0.0

    def consistency_loss(self, logits_u: Tensor, x_u: Tensor, *, step: int, total_steps: int,
                         generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        K, n = self.num_classes, len(x_u)
        p_t = torch.softmax(forward_batch_stats(self.teacher, x_u + input_noise(x_u, generator)), 1)
        reps = x_u.repeat(self.passes, *[1] * (x_u.ndim - 1))
        reps = reps + input_noise(reps, generator)  # T passes, two copies of the batch per forward
        probs = torch.cat([torch.softmax(forward_batch_stats(self.teacher, c), 1) for c in reps.split(2 * n)])
        mean = probs.view(self.passes, *p_t.shape).mean(0)
        uncertainty = -(mean * torch.log(mean + 1e-6)).sum(1, keepdim=True)
        threshold = (0.75 + 0.25 * sigmoid_ramp(step, total_steps)) * math.log(K)
        mask = (uncertainty < threshold).to(p_t)
        dist = (torch.softmax(logits_u, 1) - p_t) ** 2
        return (mask * dist).sum() / (K * mask.sum() + 1e-16), {"certain": mask.mean().item()}


class CPS(Method):
    """Cross pseudo supervision (Chen et al., CVPR 2021), as SSL4MIS's 2D code (train_cross_pseudo_supervision_2D).

    Two U-Nets with PyTorch's default initialisation, drawn one after the other so that they differ (their 2D
    script since its commit 9a74d15; their 3D script initialises one Kaiming-, one Xavier-normal), one optimiser
    each; each gets 0.5 (Dice + CE) on labels plus w(t) * CE against the other's argmax on the unlabelled images
    of the step (SSL4MIS's `outputs[labeled_bs:]`; the paper's natural-image code also uses the labelled ones:
    `pseudo_on_labelled`); w(t) = cps_weight * exp(-5 (1 - t)^2) over the run (SSL4MIS: 0.1), or cps_weight
    throughout when not `ramped` (the paper's code: 1.5 on PASCAL VOC, `CPSPaper`).
    Predictors: net1 (the paper infers with one branch), net2, and the ensemble of their probabilities.
    """

    name = "cps"
    uses_unlabelled = True
    step_cost = 4.0
    cps_weight = 0.1
    pseudo_on_labelled = False
    ramped = True

    def __init__(self, cfg: dict, **kw):
        super().__init__(cfg, **kw)
        self.net1, self.net2 = self.segmentation_net(), self.segmentation_net()
        self.dice_ce = supervised_loss(cfg)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"net1": list(self.net1.parameters()), "net2": list(self.net2.parameters())}

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x_l, y = batch["image"], batch["label"]
        x, n = torch.cat([x_l, batch["unlabelled"]]), len(x_l)
        o1, o2 = self.net1(x), self.net2(x)
        sup = 0.5 * (self.dice_ce(o1[:n], y) + self.dice_ce(o2[:n], y))
        if not self.pseudo_on_labelled:
            o1, o2 = o1[n:], o2[n:]
        cps = F.cross_entropy(o1, o2.argmax(1).detach()) + F.cross_entropy(o2, o1.argmax(1).detach())
        w = self.cps_weight * (sigmoid_ramp(step, total_steps) if self.ramped else 1.0)
        loss = sup + w * cps
        return loss, {"loss": loss.item(), "sup": sup.item(), "cps": cps.item(), "w": w}

    def ensemble(self, x: Tensor) -> Tensor:
        p = (torch.softmax(self.net1(x), 1) + torch.softmax(self.net2(x), 1)) / 2
        return torch.log(p.clamp_min(1e-6))

    def predictors(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"net1": self.net1, "net2": self.net2, "ensemble": self.ensemble}

    def pseudo_labellers(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"net1": softmax_of(self.net1), "net2": softmax_of(self.net2)}  # each labels for the other


class CPSPaper(CPS):
    """CPS with its authors' own cross terms (TorchSemiSeg, natural images; `cps` is SSL4MIS's medical port):
    the cross terms on every image of the step, labelled ones included, at the paper's PASCAL VOC weight 1.5
    from the first step (no ramp; Cityscapes: 6). Their supervised term is cross-entropy at weight 1; here it
    stays the port's 0.5 (Dice + CE), so the cross terms weigh 3x the supervised CE where theirs weigh 1.5x."""

    name = "cps-paper"
    cps_weight = 1.5
    pseudo_on_labelled = True
    ramped = False


def largest_components(labels: Tensor) -> Tensor:
    """Each image's foreground classes reduced to their largest connected component (full connectivity, as
    skimage.measure.label's default in BCP's LargestCC); a class absent from an image stays absent."""
    structure = np.ones((3,) * (labels.dim() - 1))
    out = labels.cpu().numpy().copy()
    for image in out:
        for k in np.unique(image):
            if k == 0:
                continue
            components, n = ndimage.label(image == k, structure=structure)
            if n > 1:
                sizes = np.bincount(components.ravel())[1:]
                image[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    return torch.from_numpy(out).to(labels.device)


def box_mask(spatial: tuple[int, ...], ratio: float, generator: torch.Generator) -> Tensor:
    """BCP's context_mask: 1 everywhere but 0 in a box of `ratio` of each side at a random position."""
    mask = torch.ones(spatial)
    box = []
    for s in spatial:
        b = int(s * ratio)
        start = int(torch.randint(0, max(s - b, 1), (1,), generator=generator))
        box.append(slice(start, start + b))
    mask[tuple(box)] = 0
    return mask


def masked_dice_ce(logits: Tensor, target: Tensor, mask: Tensor, smooth: float = 1e-5, *,
                   over_batch: bool = False, squared: bool = False) -> Tensor:
    """BCP's per-region term, Dice (all classes) + CE, over mask = 1. Dice per image as their 3D (LA) code's
    mask_DiceLoss, or over the whole batch (over_batch) as their 2D (ACDC) code's DiceLoss: on 2D crops,
    many with no foreground at all, a per-image Dice punishes any foreground probability at full weight.
    squared: squared terms in the denominator, as their DiceLoss (with smooth 1e-10)."""
    prob = torch.softmax(logits, 1).flatten(2)
    onehot = F.one_hot(target.flatten(1), logits.shape[1]).transpose(1, 2).to(prob)
    m = mask.flatten(1)[:, None]
    dims = (0, 2) if over_batch else 2
    total = prob ** 2 + onehot if squared else prob + onehot  # onehot ** 2 = onehot
    dice = (2 * (prob * onehot * m).sum(dims) + smooth) / ((total * m).sum(dims) + smooth)
    ce = (F.cross_entropy(logits, target, reduction="none") * mask).sum() / (mask.sum() + 1e-16)
    return 1 - dice.mean() + ce


def squared_dice(cfg: dict) -> bool:
    """Whether `train.dice` names a Dice with squared denominators (BCP's masked Dice then takes that form too)."""
    return DICE_FORMS[cfg["train"]["dice"]].get("squared", False)


def mix_loss(logits: Tensor, outside: Tensor, inside: Tensor, mask: Tensor, *, outside_weight: float,
             inside_weight: float, squared: bool = False) -> Tensor:
    """BCP's loss on a copy-paste mix: targets `outside` where mask = 1, `inside` in the pasted box; batch
    Dice for 2D inputs (their ACDC code), per-image Dice for 3D (their LA code); squared: their DiceLoss's
    squared denominators and smooth 1e-10 (`train.dice: batch-squared`)."""
    form = dict(over_batch=logits.dim() == 4, squared=squared, smooth=1e-10 if squared else 1e-5)
    return (outside_weight * masked_dice_ce(logits, outside, mask, **form)
            + inside_weight * masked_dice_ce(logits, inside, 1 - mask, **form)) / 2


def halves(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The first n images and the next n: BCP's img_a / img_b (each image of a batch in one mix)."""
    return x[:n], x[n:2 * n]


class BCPPretrain(Method):
    """BCP's first stage: copy-paste between labelled images only, as their code: the batch split in halves a
    and b, each a image gets a box of its b image, and its label likewise, both regions weighted 1. It gives
    the self-training stage a student, and so an EMA teacher, whose pseudo-labels are worth pasting from the
    first step."""

    name = "bcp-pretrain"

    def __init__(self, cfg: dict, *, student: nn.Module | None = None, **kw):
        super().__init__(cfg, **kw)
        self.student = student if student is not None else self.segmentation_net()

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        n = len(batch["image"]) // 2
        (x_a, x_b), (y_a, y_b) = halves(batch["image"], n), halves(batch["label"], n)
        mask = box_mask(tuple(x_a.shape[2:]), BCP.box_ratio, generator).to(x_a)
        mix = x_a * mask + x_b * (1 - mask)
        loss = mix_loss(self.student(mix), y_a, y_b, mask.expand(n, *mask.shape),
                        outside_weight=1.0, inside_weight=1.0, squared=squared_dice(self.cfg))
        return loss, {"loss": loss.item()}

    def predictors(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"student": self.student}


class BCP(MeanTeacher):
    """Bidirectional copy-paste (Bai et al., CVPR 2023), its LA code's two stages.

    Stage 1 (BCPPretrain): copy-paste between labelled images, for pretrain_share of train.steps: 2000 of
    15000 iterations in their 3D (LA) code, 10000 of 30000 in their 2D (ACDC) code, which decides for 2D
    networks. Stage 2, self-training: the EMA teacher (started as a copy of the stage-1
    student, then a fixed decay of 0.99, no warm-up) argmax pseudo-labels the unlabelled images, each
    foreground class reduced to its largest connected component (their LargestCC, per image); a box of
    box_ratio (2/3) of each side, at a random position, is pasted from an unlabelled image into a labelled
    one and from a labelled image into an unlabelled one; the student learns both mixes with (Dice + CE) / 2
    against the same mix of (label, pseudo-label), unlabelled regions weighted u_weight (0.5). As their code,
    each stream is split in halves a and b, each image in one mix: unlabelled a with a labelled a box,
    labelled b with an unlabelled b box (the teacher labels each unlabelled half in its own pass), and stage 2
    goes on with stage 1's optimiser state (`carry_optimizer`). Stage 1 hands on its last step, or, with
    `bcp.pretrain_checkpoint: best`, theirs: its best of 50 validations, with that step's optimiser state.
    """

    name = "bcp"
    box_ratio = 2 / 3
    u_weight = 0.5
    pretrain_share = {3: 2000 / 15000, 2: 10000 / 30000}  # by network dimensionality: their LA (3D) and ACDC (2D) codes
    ema_warmup = False

    @classmethod
    def pretrain_steps(cls, cfg: dict) -> int:
        return round(cfg["train"]["steps"] * cls.pretrain_share[cfg["data"]["dims"]])

    @classmethod
    def stages_note(cls, cfg: dict) -> str | None:
        steps = cls.pretrain_steps(cfg)
        return f"{steps} labelled copy-paste pre-training steps" if steps else None

    def stages(self) -> list[Stage]:
        steps = self.pretrain_steps(self.cfg)
        if not steps:
            return []
        stage1 = BCPPretrain(self.cfg, student=self.student, dims=self.dims, in_channels=self.in_channels,
                             num_classes=self.num_classes)
        choice = self.cfg["bcp"]["pretrain_checkpoint"]  # best: theirs, 50 validations (every 200 of 10000)
        return [Stage("pretrain", stage1, steps=steps, lr=self.cfg["train"]["lr"], carry_optimizer=True,
                      checkpoint=choice, val_every=max(1, round(steps / 50)) if choice == "best" else 0)]

    @torch.no_grad()
    def after_stages(self) -> None:
        self.teacher.load_state_dict(self.student.state_dict())

    @torch.no_grad()
    def pseudo_label(self, u: Tensor) -> Tensor:
        """The EMA teacher's argmax, each class cut to its largest component where `bcp.largest_component`."""
        labels = forward_batch_stats(self.teacher, u).argmax(1)
        return largest_components(labels) if self.cfg["bcp"]["largest_component"] else labels

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        n = min(len(batch["image"]), len(batch["unlabelled"])) // 2
        (x_a, x_b), (y_a, y_b) = halves(batch["image"], n), halves(batch["label"], n)
        u_a, u_b = halves(batch["unlabelled"], n)
        p_a, p_b = (self.pseudo_label(u) for u in (u_a, u_b))
        mask = box_mask(tuple(x_a.shape[2:]), self.box_ratio, generator).to(x_a)
        m = mask.expand(n, *mask.shape)
        squared = squared_dice(self.cfg)
        loss_u = mix_loss(self.student(u_a * mask + x_a * (1 - mask)), p_a, y_a, m,  # unlabelled, labelled box
                          outside_weight=self.u_weight, inside_weight=1.0, squared=squared)
        loss_l = mix_loss(self.student(x_b * mask + u_b * (1 - mask)), y_b, p_b, m,  # labelled, unlabelled box
                          outside_weight=1.0, inside_weight=self.u_weight, squared=squared)
        loss = loss_l + loss_u
        return loss, {"loss": loss.item(), "loss_l": loss_l.item(), "loss_u": loss_u.item()}
