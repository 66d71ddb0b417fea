"""The pseudo-label monitor: how good each pseudo-labeller's labels are, against labels training never sees.

Why: a semi-supervised method stands or falls by its pseudo-labels, and on a benchmark whose "unlabelled" cases do
have labels (LA: every training case is labelled; the split withholds the labels of those it calls unlabelled) their
quality can be measured instead of guessed. At each validation the monitor scores every pseudo-labeller a method
names (`Method.pseudo_labellers`: the EMA's, the teacher's, ...) on one fixed sample of unlabelled slices or patches:
pooled foreground Dice, precision and recall of the argmax, the share of confident pixels (`coverage`, at the
method's confidence threshold) and the Dice on those pixels alone (`dice_confident`: what a confidence-masked loss
learns from).

The withheld labels live in this object only: it hands the method images, never labels, and runs under its own
random-number state, so a run's losses and weights are the same whatever the labels hold
(tests/engine/test_monitor.py replaces them by noise). Off by default (`eval.monitor_pseudo_labels: 0`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..data.pipeline import PatchSampler, load_cases, prepare_case

MONITOR_CASES = 16  # unlabelled cases the sample is drawn from (loading every one would cost a second per case)
MONITOR_STREAM = 1000  # the sampler's stream: apart from every training stream (0, 1, 2, ...)


class PseudoLabelMonitor:
    """A fixed sample of `count` unlabelled slices (2D) or patches (3D) with their withheld labels."""

    def __init__(self, images: Tensor, labels: Tensor, *, threshold: float = 0.0, chunk: int = 32):
        self.images, self.labels, self.threshold, self.chunk = images, labels, float(threshold), chunk

    @classmethod
    def from_config(cls, cfg: dict, unlabelled_ids: list[str], *, threshold: float) -> PseudoLabelMonitor | None:
        """The sample for a run: up to MONITOR_CASES of the split's unlabelled cases (a seeded choice), half the
        samples centred on foreground; None where none of them has a label file (own data without labels)."""
        count = int(cfg["eval"]["monitor_pseudo_labels"])
        if not count or not unlabelled_ids:
            return None
        rng = np.random.default_rng([cfg["split"]["seed"], MONITOR_STREAM])
        ids = sorted(rng.permutation(sorted(unlabelled_ids))[:MONITOR_CASES].tolist())
        cases = [prepare_case(c, cfg["data"]) for c in load_cases(cfg["data"], ids) if c.label is not None]
        if not cases:
            return None
        t = cfg["train"]
        sampler = PatchSampler(cases, dims=cfg["data"]["dims"], patch=t["patch"], slice_axis=cfg["data"]["slice_axis"],
                               augment=False, fg_oversample=0.5, seed=cfg["split"]["seed"], stream=MONITOR_STREAM)
        batch = sampler.batch(0, count)
        return cls(batch["image"], batch["label"], threshold=threshold)

    @torch.no_grad()
    def __call__(self, labellers: dict[str, Callable[[Tensor], Tensor]], device: torch.device) -> dict[str, float]:
        """`pl_<labeller>_<metric>` for every labeller (image batch -> class probabilities)."""
        out: dict[str, float] = {}
        with torch.random.fork_rng(devices=[]):  # nothing the monitor draws moves the run's own random state
            for name, labeller in labellers.items():
                probs = torch.cat([labeller(x.to(device)).float().cpu() for x in self.images.split(self.chunk)])
                for metric, value in pseudo_label_scores(probs, self.labels, self.threshold).items():
                    out[f"pl_{name}_{metric}"] = value
        return out


def pseudo_label_scores(probs: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Pooled over the sample, averaged over the foreground classes: Dice, precision and recall of the argmax;
    coverage (share of pixels whose top probability reaches `threshold`) and the Dice on those pixels only."""
    confidence, pred = probs.max(1)
    confident = confidence >= threshold
    scores = {"dice": [], "precision": [], "recall": [], "dice_confident": []}
    for k in range(1, probs.shape[1]):
        p, y = pred == k, labels == k
        tp, fp, fn = (p & y).sum().item(), (p & ~y).sum().item(), (~p & y).sum().item()
        scores["dice"].append(2 * tp / max(2 * tp + fp + fn, 1))
        scores["precision"].append(tp / max(tp + fp, 1))
        scores["recall"].append(tp / max(tp + fn, 1))
        tp_c, fp_c, fn_c = ((p & y & confident).sum().item(), (p & ~y & confident).sum().item(),
                            (~p & y & confident).sum().item())
        scores["dice_confident"].append(2 * tp_c / max(2 * tp_c + fp_c + fn_c, 1))
    return {**{k: float(np.mean(v)) for k, v in scores.items()}, "coverage": float(confident.float().mean())}
