"""SuperDiffusion (Ciampi et al., arXiv 2504.01547): a two-pathway conditional diffusion teacher,
pre-trained without labels by cycle consistency, then co-trained with a student by cross
pseudo-supervision, with multi-round diffusion re-synthesis of the pseudo-labels.

See docs/METHOD.md (sections noted below). Masks and images live in [-1, 1] when noised.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.perturb import PhotometricView, cutmix, cutmix_boxes
from ..diffusion import GaussianDiffusion
from ..errors import InputError, check_positive_int
from ..nets.unet import NETS, build_unet
from .base import (
    Batch,
    Method,
    Stage,
    dice_loss,
    ema_update,
    forward_batch_stats,
    linear_ramp,
    softmax_of,
    supervised_loss,
)


def to_signal(prob: Tensor) -> Tensor:
    """Class probabilities (or one-hot masks) in [0, 1] -> the diffusion range [-1, 1]."""
    return prob * 2 - 1


# What the image pathway is conditioned on, from the mask pathway's logits (superdiffusion.mask_condition):
# `probabilities` (default) its softmax mapped to [-1, 1], the range of the labels; `logits` the raw output, as the
# reference (config.py says why that is not the default).
MASK_CONDITIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "logits": lambda logits: logits,
    "probabilities": lambda logits: to_signal(torch.softmax(logits, 1)),
}


IGNORE = -100  # a pseudo-label pixel that teaches nothing (cross-entropy's ignore_index)
READS_TEACHER = ("consensus", "fill", "agree")  # the student's targets that read the teacher's labels beside the EMA's


def agreement(prob_ema: Tensor, prob_teacher: Tensor) -> Tensor:
    """The EMA's probabilities where both argmaxes agree, uniform elsewhere: the `agree` target as a soft label, which
    the student learns through the confidence mask (above 1/K, as `agree` requires, so the vetoed pixels teach
    nothing) and the pseudo-label monitor scores as it is."""
    agree = (prob_ema.argmax(1) == prob_teacher.argmax(1)).unsqueeze(1)
    return prob_ema.where(agree, torch.full_like(prob_ema, 1 / prob_ema.shape[1]))


def confident_argmax(prob: Tensor, threshold: float) -> Tensor:
    """Argmax pseudo-labels of class probabilities; pixels whose top probability is below threshold become IGNORE
    (FixMatch)."""
    confidence, labels = prob.detach().max(1)
    return labels.masked_fill(confidence < threshold, IGNORE) if threshold > 0 else labels


def masked_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the pixels that carry a label (IGNORE elsewhere); 0 where none does."""
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum") / (target != IGNORE).sum().clamp_min(1)


def masked_dice(logits: Tensor, target: Tensor) -> Tensor:
    """1 - soft Dice per class over the whole batch, on the pixels that carry a label, averaged over the classes
    (background included; squared denominators): UniMatch's medical (ACDC) loss on confident pseudo-labels.

    Why beside the cross-entropy: LA's foreground is a few percent of each slice and its border is where the
    pseudo-labellers are unsure, so a masked cross-entropy is mostly confident background; per class, the Dice
    weighs the confident foreground as much as all the background. 0 where no pixel carries a label."""
    keep = (target != IGNORE).unsqueeze(1)  # with none kept every sum is 0 and the loss 1 - eps / eps = 0
    prob = torch.softmax(logits, 1) * keep
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).movedim(-1, 1).to(prob) * keep
    dims = [0, *range(2, logits.ndim)]
    inter, z_sum, y_sum = (prob * onehot).sum(dims), (prob * prob).sum(dims), onehot.sum(dims)
    return (1 - (2 * inter + 1e-5) / (z_sum + y_sum + 1e-5)).mean()


@contextmanager
def frozen_running_stats(module: nn.Module):
    """Batch norm keeps normalising with the batch's statistics but leaves its running ones alone (momentum 0).

    Why: the mask pathway also segments re-synthesised images, R times per step; its running statistics (used at
    inference) must describe real images.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


@contextmanager
def evaluating(*modules: nn.Module):
    """The modules in evaluation mode (no dropout; batch norm's running statistics), their modes restored after."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.train(training)


class DiffusionTeacher(nn.Module):
    """The two pathways of section 1, each a time-conditioned U-Net.

    mask pathway  f_m([m_t, x], t) -> clean-mask logits (x0-prediction over K classes)
    image pathway f_x([x_t, m], t) -> the noise eps that made x_t (eps-prediction)
    """

    def __init__(self, *, dims: int, image_channels: int, num_classes: int, model_cfg: dict,
                 diffusion_cfg: dict):
        super().__init__()
        unet = dict(dims=dims, time_embedding=model_cfg["time_embedding"])
        self.mask_net = build_unet(model_cfg, in_channels=num_classes + image_channels, out_channels=num_classes,
                                   **unet)
        self.image_net = build_unet(model_cfg, in_channels=image_channels + num_classes,
                                    out_channels=image_channels, **unet)
        self.diffusion = GaussianDiffusion(timesteps=diffusion_cfg["timesteps"],
                                           schedule=diffusion_cfg["schedule"])
        self.num_classes, self.dcfg = num_classes, diffusion_cfg

    def null_mask(self, x: Tensor) -> Tensor:
        """The all-background mask that stands in where no label exists, in [-1, 1]."""
        m = torch.full((x.shape[0], self.num_classes, *x.shape[2:]), -1.0, device=x.device, dtype=x.dtype)
        m[:, 0] = 1.0
        return m

    def mask_logits(self, x: Tensor, t: Tensor, noise: Tensor, mask: Tensor | None = None) -> Tensor:
        """f_m on the noised mask (null mask unless given) conditioned on the image x."""
        m_t = self.diffusion.q_sample(self.null_mask(x) if mask is None else mask, t, noise)
        return self.mask_net(torch.cat([m_t, x], dim=1), t)

    def image_noise(self, x: Tensor, mask_signal: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """f_x on the noised image conditioned on a mask in [-1, 1]: (eps_hat, x_t)."""
        x_t = self.diffusion.q_sample(x, t, noise)
        return self.image_net(torch.cat([x_t, mask_signal], dim=1), t), x_t

    def randn_like_mask(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.randn((x.shape[0], self.num_classes, *x.shape[2:]), generator=generator).to(x)

    # ---- inference (section 5): deterministic by default -------------------------------------
    def predict_fixed(self, x: Tensor, *, t: int, noise_seed: int) -> Tensor:
        """One x0 pass from the noised null mask at a fixed t with seeded noise: repeatable logits."""
        g = torch.Generator().manual_seed(noise_seed)
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return self.mask_logits(x, tt, self.randn_like_mask(x, g))

    def predict_ddim(self, x: Tensor, *, steps: int, noise_seed: int) -> Tensor:
        """k-step DDIM from pure noise; returns log-probabilities (softmax gives them back)."""
        g = torch.Generator().manual_seed(noise_seed)

        def denoise(m_t: Tensor, t: Tensor) -> Tensor:
            return to_signal(torch.softmax(self.mask_net(torch.cat([m_t, x], 1), t), 1))

        m0 = self.diffusion.ddim_sample(denoise, (x.shape[0], self.num_classes, *x.shape[2:]), steps=steps,
                                        generator=g, device=x.device)
        prob = ((m0 + 1) / 2).clamp_min(1e-6)
        return torch.log(prob / prob.sum(1, keepdim=True))

    def predict_ensemble(self, x: Tensor, *, samples: int, t: int, noise_seed: int) -> tuple[Tensor, Tensor]:
        """n fixed-t passes with different noise: mean probabilities and their per-pixel std (uncertainty)."""
        probs = torch.stack([torch.softmax(self.predict_fixed(x, t=t, noise_seed=noise_seed + i), 1)
                             for i in range(samples)])
        return probs.mean(0), probs.std(0, unbiased=False)[:, 1:].amax(1, keepdim=True)

    def predictor(self, mode: str | None = None, *, steps: int | None = None, samples: int | None = None,
                  noise_seed: int | None = None) -> Callable[[Tensor], Tensor]:
        """image batch -> logits by inference mode (fixed | ddim | ensemble); unset values from the config."""
        c = self.dcfg
        mode, seed, t = mode or c["inference"], c["noise_seed"] if noise_seed is None else noise_seed, c["t_infer"]
        steps = c["ddim_steps"] if steps is None else steps
        samples = c["ensemble"] if samples is None else samples
        check_positive_int("teacher steps", steps)  # 0 is not "the default"
        check_positive_int("teacher samples", samples)
        if mode == "fixed":
            return lambda x: self.predict_fixed(x, t=t, noise_seed=seed)
        if mode == "ddim":
            return lambda x: self.predict_ddim(x, steps=steps, noise_seed=seed)
        if mode == "ensemble":
            return lambda x: torch.log(self.predict_ensemble(x, samples=samples, t=t, noise_seed=seed)[0]
                                       .clamp_min(1e-6))
        raise InputError(f"diffusion.inference: unknown mode {mode!r} (fixed, ddim, ensemble)")


def build_teacher(method: Method) -> DiffusionTeacher:
    """The teacher: model.channels times superdiffusion.teacher_width (a narrower teacher is the cheaper one)."""
    width, model_cfg = method.cfg["superdiffusion"]["teacher_width"], dict(method.cfg["model"])
    if not isinstance(width, int | float) or not 0 < width <= 4:
        raise InputError(f"superdiffusion.teacher_width: {width!r} must be a number in (0, 4]")
    model_cfg["channels"] = [max(2, round(c * width)) for c in model_cfg["channels"]]
    return DiffusionTeacher(dims=method.dims, image_channels=method.in_channels, num_classes=method.num_classes,
                            model_cfg=model_cfg, diffusion_cfg=method.cfg["diffusion"])


def superdiffusion_choice(sd: dict, key: str, choices) -> str:
    """sd[key] if it is one of `choices` (names, or a dict keyed by them), else a one-line error naming the key."""
    if sd[key] not in choices:
        raise InputError(f"superdiffusion.{key}: unknown {sd[key]!r} ({', '.join(choices)})")
    return sd[key]


def superdiffusion_fraction(sd: dict, key: str, note: str = "") -> float:
    """sd[key] if it is a number in [0, 1), else a one-line error naming the key (and what 0 means: note)."""
    if not isinstance(sd[key], int | float) or not 0 <= sd[key] < 1:
        raise InputError(f"superdiffusion.{key}: {sd[key]!r} must be a number in [0, 1){note}")
    return float(sd[key])


class Pretrain(Method):
    """Stage 1 (section 2): the cycle image -> mask -> image, without any label.

    m_hat = f_m([noised null mask at t1, x], t1); eps_hat = f_x([x_t2, c(m_hat)], t2);
    L_cyc = MSE(eps_hat, eps), back-propagated through both pathways; c = superdiffusion.mask_condition
    (probabilities in [-1, 1]; the reference: the raw logits).
    """

    name = "pretrain"
    reads_diffusion = True
    reads_labels = False  # the trainer serves every training image, labels stripped
    validates = False  # no label is used, not even to pick a checkpoint: the last one is kept

    def __init__(self, cfg: dict, *, teacher: DiffusionTeacher | None = None, **kw):
        super().__init__(cfg, **kw)
        self.teacher = teacher if teacher is not None else build_teacher(self)
        self.condition = MASK_CONDITIONS[superdiffusion_choice(cfg["superdiffusion"], "mask_condition",
                                                               MASK_CONDITIONS)]

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        loss = self.cycle_loss(batch["image"], generator)
        return loss, {"cycle": loss.item()}

    def cycle_loss(self, x: Tensor, generator: torch.Generator) -> Tensor:
        T, d = self.teacher, self.teacher.diffusion
        t1, t2 = d.sample_timesteps(len(x), generator=generator), d.sample_timesteps(len(x), generator=generator)
        m_hat = T.mask_logits(x, t1, T.randn_like_mask(x, generator))
        eps = torch.randn(x.shape, generator=generator).to(x)
        eps_hat, _ = T.image_noise(x, self.condition(m_hat), t2, eps)
        return F.mse_loss(eps_hat, eps)

    def predictors(self):
        return {"teacher": self.teacher.predictor()}


class CoTrain(Method):
    """Stage 2 (sections 3 and 4): teacher and student co-trained, one optimiser each.

    L = L_l + w(step) L_u, as the reference: the labelled and the unlabelled batch each take their own forward
    passes (batch-norm statistics never mix them), each part back-propagated on its own.
    L_l = L_sup + lambda / R sum_r (L_rec^(r) + L_align^(r))  on the labelled images (alignment to the labels)
    L_u = L_cps + lambda / R sum_r (L_rec^(r) + L_align^(r))  on the unlabelled images (alignment to the
    student's argmax), so no pseudo-label weighs more than the ramped weight w.
    L_sup: Dice (+ CE) of student and teacher on labels; L_cps: each network on the other's argmax (soft Dice
    per image as the reference, Dice over the batch, or cross-entropy as the CPS paper: superdiffusion.cps_loss,
    which the rounds' alignment term uses too; each network learns on the unlabelled images themselves, as the
    reference, or on a photometric strong view of them: superdiffusion.unlabelled_view);
    rounds: the teacher re-synthesises the image from its own (detached) mask, then segments the
    re-synthesis, aligned to the target.
    """

    name = "cotrain"
    reads_diffusion = True
    uses_unlabelled = True
    uses_teacher = True  # FixMatch: the same co-training with the teacher left out
    step_cost = 16.0  # R = 3

    def __init__(self, cfg: dict, **kw):
        super().__init__(cfg, **kw)
        sd = cfg["superdiffusion"]
        for key, choices in (("student", ("unet", "twin")), ("round_mode", ("independent", "chained")),
                             ("mask_condition", MASK_CONDITIONS), ("labeller_mode", ("train", "eval"))):
            superdiffusion_choice(sd, key, choices)
        masked = {"ce": masked_cross_entropy, "dice-masked": masked_dice}  # the losses that skip IGNORE pixels
        losses = {"dice": dice_loss(), "dice-batch": dice_loss(batch=True), **masked}
        self.pseudo_loss = losses[superdiffusion_choice(sd, "cps_loss", losses)]
        if superdiffusion_fraction(sd, "confidence") and sd["cps_loss"] not in masked:
            raise InputError(f"superdiffusion.confidence: {sd['confidence']} needs superdiffusion.cps_loss "
                             f"{' or '.join(masked)} (MONAI's Dice cannot leave pixels out)")
        views = {"same": None, "photometric": PhotometricView()}
        self.unlabelled_view = views[superdiffusion_choice(sd, "unlabelled_view", views)]
        self.cutmix = superdiffusion_fraction(sd, "cutmix", " (0: no CutMix)")
        for key, low in (("rounds", 0), ("teacher_every", 1), ("round_images", 1)):
            if not (key == "round_images" and sd[key] is None) and (not isinstance(sd[key], int) or sd[key] < low):
                raise InputError(f"superdiffusion.{key}: {sd[key]!r} must be an integer >= {low}")
        if sd["student"] == "twin" and not self.uses_teacher:
            raise InputError(f"superdiffusion.student: twin is the teacher's mask pathway; {self.name} has no teacher "
                             "(use unet)")
        self.teacher = build_teacher(self) if self.uses_teacher else None
        self.student = build_teacher(self).mask_net if sd["student"] == "twin" else self.segmentation_net()
        self.sup_loss = supervised_loss(cfg)
        if superdiffusion_fraction(sd, "ema", " (0: no EMA student)") and sd["student"] != "unet":
            raise InputError("superdiffusion.ema: needs superdiffusion.student unet (the twin takes a noised mask)")
        target = superdiffusion_choice(sd, "student_target", ("consensus", "ema", "fill", "agree", "rectified"))
        if target != "consensus" and not sd["ema"]:
            raise InputError(f"superdiffusion.student_target: {target} needs an EMA student (superdiffusion.ema > 0)")
        if target == "agree" and not (sd["cps_loss"] in masked and sd["confidence"] > 1 / self.num_classes):
            raise InputError(f"superdiffusion.student_target: agree leaves the vetoed pixels out; needs "
                             f"superdiffusion.cps_loss {' or '.join(masked)} and confidence > 1/K "
                             f"({1 / self.num_classes:.2f})")
        if target in ("fill", "agree") and not self.uses_teacher:
            raise InputError(f"superdiffusion.student_target: {target} reads the teacher's labels; {self.name} has "
                             "none (use ema)")
        if target == "fill" and not sd["confidence"]:
            raise InputError("superdiffusion.student_target: fill needs superdiffusion.confidence > 0 (it fills in "
                             "the pixels where the EMA student is not confident)")
        if not isinstance(sd["rectify"], int) or not 0 <= sd["rectify"] < cfg["diffusion"]["timesteps"]:
            raise InputError(f"superdiffusion.rectify: {sd['rectify']!r} must be an integer timestep in "
                             f"[0, {cfg['diffusion']['timesteps']}) (0: off)")
        if sd["rectify"] and not (sd["ema"] and self.uses_teacher):
            raise InputError("superdiffusion.rectify: refines the EMA student's labels with the teacher's mask "
                             "pathway; needs superdiffusion.ema > 0 and a teacher")
        if target == "rectified" and not sd["rectify"]:
            raise InputError("superdiffusion.student_target: rectified needs superdiffusion.rectify > 0")
        superdiffusion_fraction(sd, "rectify_after")
        gen = sd["generative_view"]
        if isinstance(gen, bool) or not isinstance(gen, int) or not 0 <= gen < cfg["diffusion"]["timesteps"]:
            raise InputError(f"superdiffusion.generative_view: {gen!r} must be an integer timestep in "
                             f"[0, {cfg['diffusion']['timesteps']}) (0: off)")
        if gen and not (sd["ema"] and self.uses_teacher and sd["mask_condition"] == "probabilities"):
            raise InputError("superdiffusion.generative_view: the image pathway re-synthesises each unlabelled image "
                             "from the EMA student's soft label; needs superdiffusion.ema > 0, a teacher and "
                             "mask_condition probabilities")
        # an exponential moving average of the student: its pseudo-labels, not the student's own (Mean Teacher)
        self.ema = copy.deepcopy(self.student).requires_grad_(False) if sd["ema"] else None
        # no layer normalises over the batch (instance norm): images may share passes without changing each other
        self.batch_free = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())
        if sd["init"] and self.uses_teacher:
            self.load_teacher(sd["init"])

    def load_teacher(self, path: str | Path) -> None:
        from ..checkpoint import load_checkpoint

        state = load_checkpoint(path)["model"]
        teacher = {k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")}
        if not teacher:
            raise InputError(f"{path}: holds no diffusion teacher")
        try:
            self.teacher.load_state_dict(teacher)
        except RuntimeError as err:
            raise InputError(f"{path}: its teacher does not fit this config's model/diffusion settings "
                             f"({str(err).splitlines()[0][:120]})") from err

    def optimizer_groups(self):
        return {**({"teacher": list(self.teacher.parameters())} if self.teacher is not None else {}),
                "student": list(self.student.parameters())}

    def student_logits(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if isinstance(self.student, NETS) and self.student.time_mlp is None:
            return self.student(x)
        T = self.teacher  # the twin: same maths as the teacher's mask pathway, its own weights
        t = T.diffusion.sample_timesteps(len(x), generator=generator)
        m_t = T.diffusion.q_sample(T.null_mask(x), t, T.randn_like_mask(x, generator))
        return self.student(torch.cat([m_t, x], 1), t)

    def teacher_logits(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The mask pathway from the noised null mask at a random t (the teacher's training-time prediction)."""
        T = self.teacher
        return T.mask_logits(x, T.diffusion.sample_timesteps(len(x), generator=generator),
                             T.randn_like_mask(x, generator))

    def rectifier_logits(self, x: Tensor, prob: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The mask pathway as a rectifier: a soft label (class probabilities) of x noised at t -> clean-mask logits."""
        return self.teacher.mask_logits(x, t, noise, mask=to_signal(prob))

    def rectified(self, x: Tensor, prob: Tensor, generator: torch.Generator | None) -> Tensor:
        """A soft label refined in one x0 pass from rectify / 2 (SDEdit-style): class probabilities."""
        t = torch.full((len(x),), self.cfg["superdiffusion"]["rectify"] // 2, dtype=torch.long, device=x.device)
        return torch.softmax(self.rectifier_logits(x, prob, t, self.teacher.randn_like_mask(x, generator)), 1)

    def resynthesised(self, x: Tensor, prob: Tensor, generator: torch.Generator | None) -> Tensor:
        """The image pathway's one-pass re-synthesis of x from noise level generative_view, conditioned on the soft
        label prob (SDEdit-style): a strong view whose anatomy the label still describes, in the images' [-1, 1]."""
        T = self.teacher
        t = torch.full((len(x),), self.cfg["superdiffusion"]["generative_view"], dtype=torch.long, device=x.device)
        eps_hat, x_t = T.image_noise(x, to_signal(prob), t, torch.randn(x.shape, generator=generator).to(x))
        return T.diffusion.predict_x0_from_eps(x_t, t, eps_hat).clamp(-1, 1)

    def unlabelled_weight(self, step: int, total_steps: int) -> float:
        """w(step): the final unlabelled weight, ramped linearly from 0 (the reference's (e + 1) / E)."""
        return self.cfg["superdiffusion"]["unlabelled_weight"] * linear_ramp(step, total_steps)

    def rounds(self, x: Tensor, logits: Tensor, target: Tensor, generator: torch.Generator,
               scale: float | None) -> tuple[Tensor, Tensor]:
        """Section 4 on one batch: the per-round means of L_rec and L_align, starting from the teacher's logits.

        Independent rounds all start from the teacher's mask, so where no layer normalises over the batch they
        take one pass of R copies of the batch (a few large passes are cheaper than many small ones); chained
        rounds, each starting from the last one's mask, go one after another.
        scale: back-propagate each pass's terms times scale / R as soon as they are computed (the image
        pathway's graph before the mask pathway's is built) and return values only. The mask pathway's passes on
        re-synthesised images leave its batch-norm running statistics alone: those describe real images.
        """
        sd, T, d = self.cfg["superdiffusion"], self.teacher, self.teacher.diffusion
        R, condition = sd["rounds"], MASK_CONDITIONS[sd["mask_condition"]]
        mask = condition(logits).detach()
        copies = R if sd["round_mode"] == "independent" and self.batch_free else 1
        x, mask, target = (torch.cat([v] * copies) for v in (x, mask, target))
        rec = align = torch.zeros((), device=x.device)
        for _ in range(R // copies):
            t = d.sample_timesteps(len(x), generator=generator)
            eps = torch.randn(x.shape, generator=generator).to(x)
            eps_hat, x_t = T.image_noise(x, mask, t, eps)
            x_r = d.predict_x0_from_eps(x_t, t, eps_hat).detach().clamp(-1, 1)
            r_rec = F.mse_loss(eps_hat, eps)  # equal-sized copies: the mean over them is the mean of the rounds'
            if scale is not None:
                (scale * copies / R * r_rec).backward()
                r_rec = r_rec.detach()
            with frozen_running_stats(T.mask_net):
                p_r = self.teacher_logits(x_r, generator)
            r_align = sum(self.pseudo_loss(p, y) for p, y in zip(p_r.chunk(copies), target.chunk(copies),
                                                                  strict=True)) / copies
            if sd["round_mode"] == "chained":
                mask = condition(p_r).detach()
            if scale is not None:
                (scale * copies / R * r_align).backward()
                r_align = r_align.detach()
            rec, align = rec + r_rec * copies, align + r_align * copies
        return rec / R, align / R

    def passes(self, net: Callable[..., Tensor], parts: list[Tensor], generator: torch.Generator) -> list[Tensor]:
        """net on each part: in one pass over all of them where no layer normalises over the batch (instance norm:
        the same outputs, and one large pass costs less than two small ones), else one pass each (batch norm: as
        the reference, labelled and unlabelled images never share batch statistics)."""
        if not self.batch_free:
            return [net(part, generator) for part in parts]
        return list(net(torch.cat(parts), generator).split([len(part) for part in parts]))

    def losses(self, batch: Batch, *, step: int, total_steps: int, generator: torch.Generator,
               early: tuple[float, float] | None = None) -> dict[str, Tensor]:
        """Each term separately (tests check where each one's gradient goes): sup, cps, and with rounds rec and
        align (labelled images), rec_u and align_u (unlabelled images). Cost levers: the teacher learns (its
        supervised and CPS terms, the rounds) on every teacher_every-th step only, and between them only
        pseudo-labels the unlabelled images, without a graph; the rounds take the first round_images images of
        each batch; each network takes its labelled and unlabelled images in one pass where that changes nothing
        (`passes`).

        early = (w, lambda): back-propagate each part times its weight as soon as it is computed (the supervised
        and CPS terms together, then each pass of the rounds), keeping only its value. Every input that crosses
        between parts is detached (pseudo-labels, the teacher's mask, the re-synthesised images), so the gradient
        is the same, but the step's memory is that of its largest part, not the sum of all.
        """
        sd = self.cfg["superdiffusion"]
        teach = self.teacher is not None and step % sd["teacher_every"] == 0
        n = sd["round_images"]  # the rounds' share of each batch (None: all of it)
        x_l, y, x_u = batch["image"], batch["label"], batch["unlabelled"]
        gen = bool(sd["generative_view"])
        view = self.unlabelled_view is not None or self.cutmix > 0 or gen
        # labeller_mode eval: the pseudo-labellers' own pass in evaluation mode (no dropout), FixMatch's clean targets
        clean = sd["labeller_mode"] == "eval"
        own = self.ema if self.ema is not None else self.student
        labellers = (own,) if self.teacher is None else (self.teacher, own)  # whose outputs become labels
        # what the networks learn from: the labelled images and the unlabelled ones, or with a view (weak-to-strong)
        # a perturbed copy of them whose pseudo-labels come from the clean images (with generative_view first the
        # image pathway's re-synthesis from the EMA's soft label); with CutMix, images and pseudo-labels mixed by the
        # same boxes
        x_v, prob_early = x_u, None
        if gen:
            with torch.no_grad(), evaluating(*labellers) if clean else nullcontext():
                prob_early = torch.softmax(forward_batch_stats(self.ema, x_u), 1)
                with evaluating(self.teacher.image_net):
                    x_v = self.resynthesised(x_u, prob_early, generator)
        x_v = self.unlabelled_view(x_v, generator) if self.unlabelled_view is not None else x_v
        boxes = cutmix_boxes(x_u, generator, prob=self.cutmix) if self.cutmix else None
        x_v = cutmix(x_v, boxes) if boxes is not None else x_v
        s_l, s_v = self.passes(self.student_logits, [x_l, x_v], generator)
        t_l, t_v = self.passes(self.teacher_logits, [x_l, x_v], generator) if teach else (None, None)

        # the teacher's own labels, where anything reads them: the student's target (without an EMA, or unless it is
        # the EMA's alone) or the unlabelled images' rounds; `ema` without rounds reads none, so no pass is made
        teacher_labels = self.teacher is not None and (self.ema is None or sd["student_target"] in READS_TEACHER
                                                       or bool(sd["rounds"] and teach))
        rectify = bool(sd["rectify"])
        rectifying = sd["student_target"] == "rectified" and step >= sd["rectify_after"] * total_steps
        with torch.no_grad(), evaluating(*labellers) if clean else nullcontext():  # they learn nothing here
            u_t = (self.teacher_logits(x_u, generator) if view or clean or not teach else t_v) if teacher_labels \
                else None
            if self.ema is not None and rectify and teach and prob_early is not None:  # the view's labels, kept
                prob_el, prob_s = torch.softmax(forward_batch_stats(self.ema, x_l), 1), prob_early
            elif self.ema is not None and rectify and teach:  # the rectifier learns from the EMA's labelled labels too
                prob_el, prob_s = torch.softmax(forward_batch_stats(self.ema, torch.cat([x_l, x_u])), 1).split(
                    [len(x_l), len(x_u)])
            elif prob_early is not None:  # made for the generative view: the same labels it was drawn from
                prob_s = prob_early
            elif self.ema is not None:  # the EMA student pseudo-labels; the student learns the pathways' consensus
                prob_s = torch.softmax(forward_batch_stats(self.ema, x_u), 1)
            else:
                prob_s = torch.softmax((self.student_logits(x_u, generator) if view or clean else s_v).detach(), 1)
            prob_t = torch.softmax(u_t.detach(), 1) if u_t is not None else prob_s  # no teacher: its own (FixMatch)
            if self.ema is not None and u_t is not None and sd["student_target"] == "consensus":
                prob_t = (prob_t + prob_s) / 2
            elif self.ema is not None and sd["student_target"] == "agree":  # the EMA's where the teacher agrees
                prob_t = agreement(prob_s, prob_t)  # elsewhere uniform: below the confidence mask, no label
            elif self.ema is not None and sd["student_target"] in ("ema", "rectified"):  # fill: the teacher's
                prob_t = prob_s
            if rectifying:  # the EMA's labels refined by the mask pathway (before rectify_after: the EMA's alone)
                prob_t = self.rectified(x_u, prob_s, generator)
        pseudo_t, pseudo_s = confident_argmax(prob_t, sd["confidence"]), confident_argmax(prob_s, sd["confidence"])
        if sd["student_target"] == "fill":  # the EMA's label where it is sure, else the teacher's where it is
            pseudo_t = pseudo_s.where(pseudo_s != IGNORE, pseudo_t)

        mix_t, mix_s = (cutmix(p, boxes) for p in (pseudo_t, pseudo_s)) if boxes is not None else (pseudo_t, pseudo_s)

        out: dict[str, Tensor] = {"sup": self.sup_loss(s_l, y), "cps": self.pseudo_loss(s_v, mix_t)}
        if teach:
            out["sup"] = out["sup"] + self.sup_loss(t_l, y)
            out["cps"] = out["cps"] + self.pseudo_loss(t_v, mix_s)
        if teach and rectify:  # the mask pathway learns to turn the EMA's noised soft label into the true one
            t_r = torch.randint(0, sd["rectify"] + 1, (len(x_l),), generator=generator).to(x_l.device)
            out["rect"] = self.sup_loss(self.rectifier_logits(x_l, prob_el, t_r,
                                                              self.teacher.randn_like_mask(x_l, generator)), y)
        if teach and gen:  # the image pathway keeps learning to denoise images conditioned on their (true) masks
            t_g = self.teacher.diffusion.sample_timesteps(len(x_l), generator=generator)
            eps = torch.randn(x_l.shape, generator=generator).to(x_l)
            labels = F.one_hot(y, self.num_classes).movedim(-1, 1).to(x_l)
            out["gen"] = F.mse_loss(self.teacher.image_noise(x_l, to_signal(labels), t_g, eps)[0], eps)
        w, lam = early if early else (None, None)
        if early:
            (out["sup"] + out.get("rect", 0) + out.get("gen", 0) + w * out["cps"]).backward()
        if sd["rounds"] and teach:
            out["rec"], out["align"] = self.rounds(x_l[:n], t_l[:n], y[:n], generator, lam)
            out["rec_u"], out["align_u"] = self.rounds(x_u[:n], u_t[:n], pseudo_s[:n], generator,
                                                       w * lam if early else None)
        return {k: v.detach() for k, v in out.items()} if early else out

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        lam = self.cfg["superdiffusion"]["round_weight"]
        w = self.unlabelled_weight(step, total_steps)
        terms = self.losses(batch, step=step, total_steps=total_steps, generator=generator,
                            early=(w, lam) if self.early_backward else None)
        labelled, unlabelled = terms["sup"], terms["cps"]  # detached (already back-propagated) when early
        for key in ("rect", "gen"):  # the mask pathway as a rectifier, the image pathway as a denoiser
            if key in terms:
                labelled = labelled + terms[key]
        if "rec" in terms:  # lambda / R per round == lambda times the per-round mean
            labelled = labelled + lam * (terms["rec"] + terms["align"])
            unlabelled = unlabelled + lam * (terms["rec_u"] + terms["align_u"])
        loss = labelled + w * unlabelled
        return loss, {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "w": w}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self.ema is not None:
            ema_update(self.ema, self.student, min(1 - 1 / (step + 1), self.cfg["superdiffusion"]["ema"]))

    def predictors(self):
        student: Callable[[Tensor], Tensor] = self.student if isinstance(self.student, NETS) and \
            self.student.time_mlp is None else self._twin_fixed
        return {"student": student, **({"teacher": self.teacher.predictor()} if self.teacher is not None else {}),
                **({"ema": self.ema} if self.ema is not None else {})}

    @property
    def pseudo_label_threshold(self) -> float:
        return float(self.cfg["superdiffusion"]["confidence"])

    def pseudo_labellers(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """The labellers of the training step, as it runs them: the EMA student (or the student itself), the teacher's
        mask pathway from the noised null mask at a random t (seeded here: the same draws at every validation), and
        with `consensus` the mean of both, the student's target."""
        g = torch.Generator().manual_seed(0)
        out = {"ema": softmax_of(self.ema)} if self.ema is not None else \
            {"student": lambda x: torch.softmax(self.student_logits(x, g), 1)}
        if self.teacher is not None:
            out["teacher"] = lambda x: torch.softmax(self.teacher_logits(x, g), 1)
            if self.ema is not None and self.cfg["superdiffusion"]["student_target"] == "consensus":
                out["consensus"] = lambda x: (out["ema"](x) + out["teacher"](x)) / 2
            if self.ema is not None and self.cfg["superdiffusion"]["student_target"] == "agree":
                out["agreement"] = lambda x: agreement(out["ema"](x), out["teacher"](x))
            if self.cfg["superdiffusion"]["rectify"]:
                out["rectified"] = lambda x: self.rectified(x, out["ema"](x), g)
        return out

    def _twin_fixed(self, x: Tensor) -> Tensor:
        c = self.cfg["diffusion"]
        g = torch.Generator().manual_seed(c["noise_seed"])
        T = self.teacher
        t = torch.full((len(x),), c["t_infer"], dtype=torch.long, device=x.device)
        m_t = T.diffusion.q_sample(T.null_mask(x), t, T.randn_like_mask(x, g))
        return self.student(torch.cat([m_t, x], 1), t)


class SuperDiffusion(CoTrain):
    """The whole pipeline in one run folder: stage 1 (pretrain, in `pretrain/`), then co-training."""

    name = "superdiffusion"

    @classmethod
    def stages_note(cls, cfg: dict) -> str | None:
        sd = cfg["superdiffusion"]
        return f"{sd['pretrain_steps']} cycle pre-training steps" if sd["pretrained"] else None

    def stages(self) -> list[Stage]:
        sd = self.cfg["superdiffusion"]
        if not sd["pretrained"]:  # ablation: co-training from a randomly initialised teacher
            return []
        stage1 = Pretrain(self.cfg, teacher=self.teacher, dims=self.dims, in_channels=self.in_channels,
                          num_classes=self.num_classes)
        return [Stage("pretrain", stage1, steps=sd["pretrain_steps"], lr=sd["pretrain_lr"])]


class FixMatch(CoTrain):
    """The teacher-less control: SuperDiffusion's co-training with the diffusion teacher left out, one code path.

    Why: with `student_target: ema` (la2d's) no output or parameter of the teacher reaches the student, whose
    loss is the supervised term plus w(step) times the masked cross-entropy on its EMA's confident argmax of the
    clean image, learned on a photometric strong view (FixMatch's weak-to-strong recipe with a Mean Teacher
    labeller). This method trains exactly that student, reading the same `superdiffusion.*` keys (confidence,
    ema, unlabelled_view, cps_loss, labeller_mode, unlabelled_weight, cutmix), so the two cannot drift apart;
    without an EMA the student labels for itself (in evaluation mode with `labeller_mode: eval`: FixMatch).
    """

    name = "fixmatch"
    uses_teacher = False
    step_cost = 2.0
