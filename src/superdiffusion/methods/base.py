"""What every training method is: networks, the losses of one step, and how it predicts.

The shared trainer (engine/trainer.py) owns everything else: data streams, optimisers (one per entry
of `optimizer_groups`), schedules, validation, logging and checkpoints. A method is therefore a small
class; adding one never copies a training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import Tensor, nn

from ..nets.unet import SegNet, build_unet

Batch = dict[str, Tensor]


class Method(nn.Module):
    """Base class. Subclasses set `name`, build networks in __init__ and implement `training_step`."""

    name = "method"
    uses_unlabelled = False  # whether the trainer must feed an unlabelled stream ("unlabelled" key)
    unlabelled_draws = 1  # unlabelled batches per step (UniMatch: 2, its CutMix partners the second)
    # the config sections only the diffusion methods read: a change there leaves other methods' runs as they are
    reads_diffusion = False
    # Set by the trainer when gradients are zeroed before the step and no DDP reducer waits for a single
    # backward: a method may then back-propagate independent parts of its loss inside the step, to free
    # memory, and return them detached.
    early_backward = False
    # A training step's cost in supervised steps (bench-speed's ratios, 2D): `bench --jobs` starts the dearest
    # runs first, so that no long run is left alone at the end.
    step_cost = 1.0

    def __init__(self, cfg: dict, *, dims: int, in_channels: int, num_classes: int):
        super().__init__()
        self.cfg, self.dims, self.in_channels, self.num_classes = cfg, dims, in_channels, num_classes

    def segmentation_net(self) -> SegNet:
        """A plain U-Net from the `model` config: image in, class logits out."""
        return build_unet(self.cfg["model"], dims=self.dims, in_channels=self.in_channels,
                          out_channels=self.num_classes)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """One optimiser per entry; by default a single one over every parameter."""
        return {"model": [p for p in self.parameters() if p.requires_grad]}

    def training_step(self, batch: Batch, *, step: int, total_steps: int,
                      generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The loss to back-propagate and the numbers to log."""
        raise NotImplementedError

    def forward(self, batch: Batch, *, step: int, total_steps: int,
                generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The training step, as a forward pass so DistributedDataParallel can wrap the whole method."""
        return self.training_step(batch, step=step, total_steps=total_steps, generator=generator)

    def stages(self) -> list[Stage]:
        """Stages trained before this method's own (none by default)."""
        return []

    @classmethod
    def stages_note(cls, cfg: dict) -> str | None:
        """What the earlier stages do, for reports ("500 cycle pre-training steps"); None without stages."""
        return None

    def after_stages(self) -> None:
        """Hook once the earlier stages are trained (or reloaded), before this method's own training."""

    def after_step(self, step: int) -> None:
        """Hook after the optimisers stepped (EMA updates)."""

    def predictors(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """Named functions image batch -> logits; the first is the default."""
        raise NotImplementedError

    def pseudo_labellers(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """Named functions image batch -> class probabilities: whatever makes this method's pseudo-labels, for the
        pseudo-label monitor (engine/monitor.py; called in evaluation mode). None by default."""
        return {}

    # the confidence a pseudo-label pixel needs to teach anything (the monitor's coverage); 0: every pixel teaches
    pseudo_label_threshold = 0.0


@dataclass
class Stage:
    """An earlier stage of a pipeline (e.g. SuperDiffusion's label-free pre-training), run in its own
    sub-folder of the run; `method` shares its networks with the final method."""

    folder: str
    method: Method
    steps: int
    lr: float
    carry_optimizer: bool = False  # the final method's optimiser starts from this stage's state (not its lr)
    checkpoint: str = "last"  # what it hands on: last | best (on validation, every val_every steps; BCP's code)
    val_every: int = 0  # 0: the stage never validates


def dice_loss(*, ce: bool = False, batch: bool = False, squared: bool = False) -> nn.Module:
    """Soft Dice over all classes (optionally + cross-entropy) on logits and integer labels (B, *); per image,
    or over the whole batch (batch=True: an image without foreground then costs little); squared: squared terms
    in the denominator (V-Net's and SSL4MIS's DiceLoss)."""
    loss = (DiceCELoss if ce else DiceLoss)(to_onehot_y=True, softmax=True, include_background=True, batch=batch,
                                            squared_pred=squared)
    return _IntegerTargets(loss)


# train.dice: the Dice of the supervised terms. image: MONAI's, per image (the protocols'); batch-squared: over the
# batch with squared denominators, smooth 1e-5 (SSL4MIS's DiceLoss, which their 2D scripts use)
DICE_FORMS = {"image": {}, "batch-squared": {"batch": True, "squared": True}}


def supervised_loss(cfg: dict) -> nn.Module:
    """Dice + cross-entropy on labels, the Dice in the form `train.dice` names."""
    return dice_loss(ce=True, **DICE_FORMS[cfg["train"]["dice"]])


class _IntegerTargets(nn.Module):
    """Adapts MONAI's (B, 1, *) label convention to the (B, *) integer maps used here."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.loss(logits, target[:, None])


def softmax_of(net: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """image batch -> net's class probabilities (a pseudo-labeller for the monitor)."""
    return lambda x: torch.softmax(net(x), 1)


def linear_ramp(step: int, total_steps: int) -> float:
    """The reference's unlabelled weight (e + 1) / E, per step instead of per epoch."""
    return min(1.0, (step + 1) / max(total_steps, 1))


@torch.no_grad()
def forward_batch_stats(net: nn.Module, x: Tensor) -> Tensor:
    """net(x) as the official codes run their EMA teacher (train mode: batch statistics), with its buffers put
    back afterwards, so the teacher's running statistics follow the student's by EMA only. (Saving and restoring
    the buffers costs two fused copies; torch.func.functional_call on copies cost ~1 ms of module traversal.)"""
    if not net.training:
        return net(x)
    buffers = list(net.buffers())  # none under instance norm
    saved = [b.clone() for b in buffers]
    out = net(x)
    if buffers:
        torch._foreach_copy_(buffers, saved)
    return out


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay average + (1 - decay) model, parameters and floating buffers (BN statistics); integer
    buffers (BN's batch counter) copied. Fused over tensors: a per-tensor loop launched ~200 kernels a step."""
    pairs = list(zip(average.parameters(), model.parameters(), strict=True))
    counters = []
    for a, m in zip(average.buffers(), model.buffers(), strict=True):
        (pairs if a.is_floating_point() else counters).append((a, m))
    averages, models = [a for a, _ in pairs], [m for _, m in pairs]
    if averages:
        torch._foreach_mul_(averages, decay)
        torch._foreach_add_(averages, models, alpha=1 - decay)
    for a, m in counters:
        a.copy_(m)
