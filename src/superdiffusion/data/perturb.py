"""Photometric "strong views" of image batches for consistency training (FixMatch, UniMatch).

Why: pseudo-labels made on the clean image and learned on a perturbed one teach invariance to the
scanner and contrast differences that a few labelled cases never show. Only intensities change, never
geometry, so a pseudo-label of the clean view is the right target for the perturbed one.
"""

from __future__ import annotations

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandShiftIntensity,
)
from monai.utils import convert_to_tensor
from torch import Tensor


class PhotometricView:
    """Random intensity scale and shift, gamma, blur and noise (MONAI's transforms), per image of a batch.

    Images are in [-1, 1] (the pipeline's intensity scaling); the draws come from the caller's generator,
    so a resumed run perturbs exactly as an uninterrupted one.
    """

    def __init__(self, *, prob: float = 0.8):
        self.transform = Compose([
            RandScaleIntensity(factors=0.25, prob=prob),
            RandShiftIntensity(offsets=0.25, prob=prob),
            RandAdjustContrast(gamma=(0.6, 1.6), prob=prob),
            RandGaussianSmooth(sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0), prob=prob / 2),
            RandGaussianNoise(std=0.1, prob=prob),
        ])

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        self.transform.set_random_state(seed=int(torch.randint(2**31 - 1, (1,), generator=generator)))
        out = torch.empty_like(x)  # keeps the batch's memory format (channels-last)
        for i, image in enumerate(x):
            out[i] = convert_to_tensor(self.transform(image), track_meta=False)
        return out
