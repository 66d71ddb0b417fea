"""Photometric "strong views" of image batches for consistency training (FixMatch, UniMatch).

Why: pseudo-labels made on the clean image and learned on a perturbed one teach invariance to the
scanner and contrast differences that a few labelled cases never show. Only intensities change, never
geometry, so a pseudo-label of the clean view is the right target for the perturbed one.
"""

from __future__ import annotations

import torch
from monai.networks.layers import GaussianFilter
from torch import Tensor


class PhotometricView:
    """Random intensity scale and shift, gamma, blur and noise, each drawn per image of a batch, in the order and
    with the ranges of MONAI's RandScaleIntensity(0.25), RandShiftIntensity(0.25), RandAdjustContrast((0.6, 1.6)),
    RandGaussianSmooth(sigma 0.25-1, at prob / 2) and RandGaussianNoise(std up to 0.1); the blur is MONAI's
    GaussianFilter.

    Why batched tensor maths rather than those transforms: they run image by image, and on 16 slices of 96x96
    took 26 ms, a tenth of a co-training step; this takes a few. Images are in [-1, 1] (the pipeline's intensity
    scaling); every draw comes from the caller's generator, so a resumed run perturbs exactly as an uninterrupted
    one.
    """

    def __init__(self, *, prob: float = 0.8, scale: float = 0.25, shift: float = 0.25,
                 gamma: tuple[float, float] = (0.6, 1.6), sigma: tuple[float, float] = (0.25, 1.0),
                 noise_std: float = 0.1):
        self.prob, self.scale, self.shift, self.gamma, self.sigma, self.noise_std = (prob, scale, shift, gamma,
                                                                                     sigma, noise_std)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n, spatial = len(x), x.ndim - 2

        def uniform(low: float, high: float, p: float, neutral: float) -> Tensor:
            """One value per image, broadcastable over it; `neutral` where the perturbation is not drawn (prob p)."""
            value = low + (high - low) * torch.rand(n, generator=generator)
            value = torch.where(torch.rand(n, generator=generator) < p, value, torch.full_like(value, neutral))
            return value.to(x).view(n, *[1] * (x.ndim - 1))

        scale = uniform(-self.scale, self.scale, self.prob, 0.0)
        shift = uniform(-self.shift, self.shift, self.prob, 0.0)
        gamma = uniform(*self.gamma, self.prob, 1.0)
        blur = torch.rand(n, generator=generator) < self.prob / 2
        sigmas = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(n, spatial, generator=generator)
        std = uniform(0.0, self.noise_std, self.prob, 0.0)
        noise = torch.randn(x.shape, generator=generator).to(x)

        out = x * (1 + scale) + shift
        low = out.flatten(1).amin(1).view_as(gamma)
        span = out.flatten(1).amax(1).view_as(gamma) - low
        out = ((out - low) / (span + 1e-7)).clamp_min(0) ** gamma * span + low  # AdjustContrast's gamma
        for i in blur.nonzero().flatten().tolist():
            out[i] = GaussianFilter(spatial, sigmas[i].tolist())(out[i:i + 1])[0]
        return torch.empty_like(x).copy_(out + noise * std)  # keeps the batch's memory format (channels-last)


def cutmix_boxes(x: Tensor, generator: torch.Generator, *, prob: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                 aspect: float = 1 / 0.3) -> Tensor:
    """One random box per image of a batch x (N, C, *spatial), drawn with probability prob: a boolean (N, *spatial).

    UniMatch's obtain_cutmix_box, generalised to 3D: the box covers a uniform fraction `area` of the image, its
    sides' ratios within `aspect` (log-uniform, centred), at a uniform position inside the image.
    """
    n, spatial = len(x), x.shape[2:]
    boxes = torch.zeros(n, *spatial, dtype=torch.bool)
    for i in range(n):
        draws = torch.rand(2 + 2 * len(spatial), generator=generator).tolist()
        if draws[0] >= prob:
            continue
        fraction = area[0] + (area[1] - area[0]) * draws[1]
        log_ratio = (torch.tensor(draws[2:2 + len(spatial)]) - 0.5) * torch.log(torch.tensor(aspect))
        log_ratio -= log_ratio.mean()  # the sides' product stays `fraction` of the image
        sides = [max(1, min(size, round(size * fraction ** (1 / len(spatial)) * float(r.exp()))))
                 for size, r in zip(spatial, log_ratio, strict=True)]
        starts = [int(u * (size - side + 1)) for u, size, side in zip(draws[2 + len(spatial):], spatial, sides,
                                                                        strict=True)]
        boxes[(i, *(slice(s, s + side) for s, side in zip(starts, sides, strict=True)))] = True
    return boxes.to(x.device)


def cutmix(x: Tensor, boxes: Tensor) -> Tensor:
    """Image i takes image i - 1's pixels inside its box (images (N, C, ...) or label maps (N, ...) alike), so a
    pseudo-label map mixed by the same boxes stays the right target for mixed images (UniMatch, CutMix)."""
    inside = boxes.unsqueeze(1) if x.ndim == boxes.ndim + 1 else boxes
    return torch.where(inside, x.roll(1, 0), x)
