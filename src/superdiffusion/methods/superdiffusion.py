"""SuperDiffusion (Ciampi et al., arXiv 2504.01547): a two-pathway conditional diffusion teacher,
pre-trained without labels by cycle consistency, then co-trained with a student by cross
pseudo-supervision, with multi-round diffusion re-synthesis of the pseudo-labels.

See docs/METHOD.md (sections noted below). Masks and images live in [-1, 1] when noised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.perturb import PhotometricView
from ..diffusion import GaussianDiffusion
from ..errors import InputError
from ..nets.unet import NETS, build_unet
from .base import Batch, Method, Stage, dice_loss, linear_ramp


def to_signal(prob: Tensor) -> Tensor:
    """Class probabilities (or one-hot masks) in [0, 1] -> the diffusion range [-1, 1]."""
    return prob * 2 - 1


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
        steps, samples = steps or c["ddim_steps"], samples or c["ensemble"]
        if mode == "fixed":
            return lambda x: self.predict_fixed(x, t=t, noise_seed=seed)
        if mode == "ddim":
            return lambda x: self.predict_ddim(x, steps=steps, noise_seed=seed)
        if mode == "ensemble":
            return lambda x: torch.log(self.predict_ensemble(x, samples=samples, t=t, noise_seed=seed)[0]
                                       .clamp_min(1e-6))
        raise InputError(f"diffusion.inference: unknown mode {mode!r} (fixed, ddim, ensemble)")


def build_teacher(method: Method) -> DiffusionTeacher:
    return DiffusionTeacher(dims=method.dims, image_channels=method.in_channels, num_classes=method.num_classes,
                            model_cfg=method.cfg["model"], diffusion_cfg=method.cfg["diffusion"])


def superdiffusion_choice(sd: dict, key: str, choices) -> str:
    """sd[key] if it is one of `choices` (names, or a dict keyed by them), else a one-line error naming the key."""
    if sd[key] not in choices:
        raise InputError(f"superdiffusion.{key}: unknown {sd[key]!r} ({', '.join(choices)})")
    return sd[key]


class Pretrain(Method):
    """Stage 1 (section 2): the cycle image -> mask -> image, without any label.

    m_hat = f_m([noised null mask at t1, x], t1); eps_hat = f_x([x_t2, softmax(m_hat)], t2);
    L_cyc = MSE(eps_hat, eps), back-propagated through both pathways.
    """

    name = "pretrain"
    reads_labels = False  # the trainer serves every training image, labels stripped
    validates = False  # no label is used, not even to pick a checkpoint: the last one is kept

    def __init__(self, cfg: dict, *, teacher: DiffusionTeacher | None = None, **kw):
        super().__init__(cfg, **kw)
        self.teacher = teacher if teacher is not None else build_teacher(self)

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        loss = self.cycle_loss(batch["image"], generator)
        return loss, {"cycle": loss.item()}

    def cycle_loss(self, x: Tensor, generator: torch.Generator) -> Tensor:
        T, d = self.teacher, self.teacher.diffusion
        t1, t2 = d.sample_timesteps(len(x), generator=generator), d.sample_timesteps(len(x), generator=generator)
        m_hat = torch.softmax(T.mask_logits(x, t1, T.randn_like_mask(x, generator)), 1)
        eps = torch.randn(x.shape, generator=generator).to(x)
        eps_hat, _ = T.image_noise(x, to_signal(m_hat), t2, eps)
        return F.mse_loss(eps_hat, eps)

    def predictors(self):
        return {"teacher": self.teacher.predictor()}


class CoTrain(Method):
    """Stage 2 (sections 3 and 4): teacher and student co-trained, one optimiser each.

    L = L_sup + w(step) L_cps + lambda / R * sum_r (L_rec^(r) + L_align^(r))
    L_sup: Dice (+ CE) of student and teacher on labels; L_cps: each network on the other's argmax (soft Dice
    per image as the reference, Dice over the batch, or cross-entropy as the CPS paper: superdiffusion.cps_loss,
    which the rounds' alignment term uses too; each network learns on the unlabelled images themselves, as the
    reference, or on a photometric strong view of them: superdiffusion.unlabelled_view);
    rounds: the teacher re-synthesises the image from its own (detached) mask, then segments the
    re-synthesis, aligned to the student's argmax (unlabelled) or the label (labelled).
    """

    name = "cotrain"
    uses_unlabelled = True
    step_cost = 16.0  # R = 3

    def __init__(self, cfg: dict, **kw):
        super().__init__(cfg, **kw)
        sd = cfg["superdiffusion"]
        for key, choices in (("student", ("unet", "twin")), ("round_mode", ("independent", "chained")),
                             ("align_unlabelled", ("full", "ramped")), ("student_passes", ("joint", "split"))):
            superdiffusion_choice(sd, key, choices)
        losses = {"dice": dice_loss(), "dice-batch": dice_loss(batch=True), "ce": nn.CrossEntropyLoss()}
        self.pseudo_loss = losses[superdiffusion_choice(sd, "cps_loss", losses)]
        views = {"same": None, "photometric": PhotometricView()}
        self.unlabelled_view = views[superdiffusion_choice(sd, "unlabelled_view", views)]
        if not isinstance(sd["rounds"], int) or sd["rounds"] < 0:
            raise InputError(f"superdiffusion.rounds: {sd['rounds']!r} must be an integer >= 0")
        self.teacher = build_teacher(self)
        self.student = build_teacher(self).mask_net if sd["student"] == "twin" else self.segmentation_net()
        self.sup_loss = dice_loss(ce=True)
        if sd["init"]:
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
        return {"teacher": list(self.teacher.parameters()), "student": list(self.student.parameters())}

    def student_logits(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if isinstance(self.student, NETS) and self.student.time_mlp is None:
            return self.student(x)
        T = self.teacher  # the twin: same maths as the teacher's mask pathway, its own weights
        t = T.diffusion.sample_timesteps(len(x), generator=generator)
        m_t = T.diffusion.q_sample(T.null_mask(x), t, T.randn_like_mask(x, generator))
        return self.student(torch.cat([m_t, x], 1), t)

    def unlabelled_weight(self, step: int, total_steps: int) -> float:
        """w(step): the final unlabelled weight, ramped linearly from 0 (the reference's (e + 1) / E)."""
        return self.cfg["superdiffusion"]["unlabelled_weight"] * linear_ramp(step, total_steps)

    def losses(self, batch: Batch, *, step: int, total_steps: int, generator: torch.Generator,
               early: tuple[float, float] | None = None) -> dict[str, Tensor]:
        """Each term separately (tests check where each one's gradient goes).

        early = (w, lambda): back-propagate sup + w cps as soon as it is computed, then each round's terms
        times lambda / R, keeping only their values. Every input that crosses between these parts is
        detached (pseudo-labels, the teacher's mask, the re-synthesised images), so the gradient is the
        same, but the step's memory is that of its largest part, not the sum of all: flat in R.
        """
        sd, T, d = self.cfg["superdiffusion"], self.teacher, self.teacher.diffusion
        w = self.unlabelled_weight(step, total_steps)
        x_l, y, x_u = batch["image"], batch["label"], batch["unlabelled"]
        x, n_l = torch.cat([x_l, x_u]), len(x_l)
        p_t = T.mask_logits(x, d.sample_timesteps(len(x), generator=generator), T.randn_like_mask(x, generator))
        if sd["student_passes"] == "split":  # batch-norm statistics of labelled crops never mix with unlabelled ones
            p_s = torch.cat([self.student_logits(x_l, generator), self.student_logits(x_u, generator)])
        else:
            p_s = self.student_logits(x, generator)
        pseudo_t, pseudo_s = p_t[n_l:].argmax(1).detach(), p_s[n_l:].argmax(1).detach()
        u_s, u_t = p_s[n_l:], p_t[n_l:]
        if self.unlabelled_view is not None:  # pseudo-labels of the clean view, learned on the perturbed one
            x_v = self.unlabelled_view(x_u, generator)
            u_s = self.student_logits(x_v, generator)
            u_t = T.mask_logits(x_v, d.sample_timesteps(len(x_v), generator=generator),
                                T.randn_like_mask(x_v, generator))
        out = {"sup": self.sup_loss(p_s[:n_l], y) + self.sup_loss(p_t[:n_l], y),
               "cps": self.pseudo_loss(u_s, pseudo_t) + self.pseudo_loss(u_t, pseudo_s)}
        if early:
            (out["sup"] + early[0] * out["cps"]).backward()
            out = {k: v.detach() for k, v in out.items()}
        rounds = sd["rounds"]
        if rounds:
            target = torch.cat([y, pseudo_s])
            mask = torch.softmax(p_t, 1).detach()
            rec = align = 0.0
            for _ in range(rounds):
                t = d.sample_timesteps(len(x), generator=generator)
                eps = torch.randn(x.shape, generator=generator).to(x)
                eps_hat, x_t = T.image_noise(x, to_signal(mask), t, eps)
                x_r = d.predict_x0_from_eps(x_t, t, eps_hat).detach().clamp(-1, 1)
                r_rec = F.mse_loss(eps_hat, eps)
                if early:  # the image pathway's graph goes before the mask pathway's is built
                    (early[1] / rounds * r_rec).backward()
                    r_rec = r_rec.detach()
                p_r = T.mask_logits(x_r, d.sample_timesteps(len(x), generator=generator),
                                    T.randn_like_mask(x, generator))
                if sd["align_unlabelled"] == "ramped":  # per-image mean over the batch, pseudo-labels x w
                    r_align = (n_l * self.pseudo_loss(p_r[:n_l], y) +
                               w * len(x_u) * self.pseudo_loss(p_r[n_l:], pseudo_s)) / len(x)
                else:
                    r_align = self.pseudo_loss(p_r, target)
                if sd["round_mode"] == "chained":
                    mask = torch.softmax(p_r, 1).detach()
                if early:
                    (early[1] / rounds * r_align).backward()
                    r_align = r_align.detach()
                rec, align = rec + r_rec, align + r_align
            out["rec"], out["align"] = rec / rounds, align / rounds
        return out

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        sd = self.cfg["superdiffusion"]
        w = self.unlabelled_weight(step, total_steps)
        terms = self.losses(batch, step=step, total_steps=total_steps, generator=generator,
                            early=(w, sd["round_weight"]) if self.early_backward else None)
        loss = terms["sup"] + w * terms["cps"]  # detached (already back-propagated) when early
        if "rec" in terms:  # lambda / R per round == lambda times the per-round mean
            loss = loss + sd["round_weight"] * (terms["rec"] + terms["align"])
        return loss, {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "w": w}

    def predictors(self):
        student: Callable[[Tensor], Tensor] = self.student if isinstance(self.student, NETS) and \
            self.student.time_mlp is None else self._twin_fixed
        return {"student": student, "teacher": self.teacher.predictor()}

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
