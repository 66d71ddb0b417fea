"""UniMatch (Yang et al., CVPR 2023), as its authors' medical (ACDC) code: more-scenarios/medical/unimatch.py.

Why here: the field's standard 2D weak-to-strong baseline, so that SuperDiffusion's gain is measured against the
method a user would otherwise pick.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..data.perturb import ColourJitterView, cutmix_boxes
from ..errors import InputError
from .base import Batch, Method, softmax_of, supervised_loss
from .superdiffusion import IGNORE, confident_argmax, evaluating, masked_dice


class UniMatch(Method):
    """One network, no EMA. Each step draws two unlabelled batches: u (learned from) and m (CutMix partners).

    - weak: the network's training-mode pass over [labelled, u] (one pass, as theirs) gives the labelled logits and
      u's pseudo-labels (detached argmax; pixels below `confidence` 0.95 ignored); m's pseudo-labels come from a
      no-grad pass in evaluation mode, as theirs;
    - feature perturbation: u's encoder features, each through Dropout2d(0.5), decoded a second time; it learns u's
      pseudo-labels;
    - two strong views of u and of m (ColourJitterView: ColorJitter(0.5, 0.5, 0.5, 0.25) at 0.8, blur at 0.5), each
      u view taking a box of the m view of the same draw with probability 0.5 (its pseudo-label mixed by the same box);
    - loss = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, L_x = (CE + Dice) / 2 on labels, the unlabelled terms
      their masked Dice (per class over the batch, squared denominators, on the confident pixels: `masked_dice`).
    Differences from their code are listed in docs/DESIGN.md.
    """

    name = "unimatch"
    uses_unlabelled = True
    unlabelled_draws = 2  # the trainer draws 2 x train.unlabelled_batch_size unlabelled images: u, then m
    step_cost = 5.0
    confidence = 0.95
    fp_dropout = 0.5
    cutmix_prob = 0.5
    weights = {"s1": 0.25, "s2": 0.25, "fp": 0.5}
    pseudo_label_threshold = confidence

    def __init__(self, cfg: dict, **kw):
        super().__init__(cfg, **kw)
        self.net = self.segmentation_net()
        if not hasattr(self.net, "encode"):
            raise InputError(f"model.arch: {cfg['model']['arch']!r} has no separate encoder and decoder for "
                             "UniMatch's feature perturbation (use monai or ssl4mis)")
        self.sup_loss = supervised_loss(cfg)
        self.strong = ColourJitterView()
        self.drop = nn.Dropout2d(self.fp_dropout) if self.dims == 2 else nn.Dropout3d(self.fp_dropout)

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x_l, y = batch["image"], batch["label"]
        x_u, x_m = batch["unlabelled"].chunk(2)
        n_l = len(x_l)
        with torch.no_grad(), evaluating(self.net):  # the CutMix partners' pseudo-labels, in evaluation mode
            prob_m = torch.softmax(self.net(x_m), 1)
        views = []
        for _ in range(2):  # s1, s2: each its own jitter of u and of m, and its own boxes
            s_u, s_m = self.strong(x_u, generator), self.strong(x_m, generator)
            boxes = cutmix_boxes(x_u, generator, prob=self.cutmix_prob)
            views.append((torch.where(boxes.unsqueeze(1), s_m, s_u), boxes))
        features = self.net.encode(torch.cat([x_l, x_u]))
        logits = self.net.decode(features)
        logits_l, logits_u = logits[:n_l], logits[n_l:]
        logits_fp = self.net.decode([self.drop(f[n_l:]) for f in features])
        logits_s1, logits_s2 = self.net(torch.cat([v for v, _ in views])).chunk(2)

        prob_u = torch.softmax(logits_u.detach(), 1)
        target_u = confident_argmax(prob_u, self.confidence)
        target_m = confident_argmax(prob_m, self.confidence)
        terms = {"x": 0.5 * self.sup_loss(logits_l, y), "fp": masked_dice(logits_fp, target_u)}
        for key, out, (_, boxes) in (("s1", logits_s1, views[0]), ("s2", logits_s2, views[1])):
            terms[key] = masked_dice(out, torch.where(boxes, target_m, target_u))
        loss = (terms["x"] + sum(w * terms[k] for k, w in self.weights.items())) / 2
        coverage = float((target_u != IGNORE).float().mean())
        return loss, {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "coverage": coverage}

    def predictors(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"student": self.net}

    def pseudo_labellers(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"student": softmax_of(self.net)}
