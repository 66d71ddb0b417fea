"""Supervised baselines: the lower bound (labelled subset only) and the upper bound (all labels)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Batch, Method, supervised_loss


class Supervised(Method):
    """A U-Net trained with 0.5 (Dice + cross-entropy) on the labelled cases only: SSL4MIS's supervised script
    weighs it 0.5 as the baselines' supervised terms, which matters with SGD (with Adam the steps do not
    scale with the loss)."""

    name = "supervised"

    def __init__(self, cfg: dict, **kw):
        super().__init__(cfg, **kw)
        self.net = self.segmentation_net()
        self.loss = supervised_loss(cfg)

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        loss = 0.5 * self.loss(self.net(batch["image"]), batch["label"])
        return loss, {"loss": loss.item()}

    def predictors(self):
        return {"student": self.net}


class FullySupervised(Supervised):
    """The same training on every training case's label: the upper bound of any semi-supervised method."""

    name = "fully-supervised"
    all_labelled = True
