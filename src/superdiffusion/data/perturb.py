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


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """(N, 3, *spatial) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle)."""
    r, g, b = rgb.unbind(1)
    high, low = rgb.amax(1), rgb.amin(1)
    delta = high - low
    safe = delta.clamp_min(1e-12)
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    sat = torch.where(high > 0, delta / high.clamp_min(1e-12), torch.zeros_like(high))
    return torch.stack([hue, sat, high], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """The inverse of rgb_to_hsv."""
    hue, sat, val = hsv.unbind(1)
    sector = torch.floor(hue * 6)
    frac = hue * 6 - sector
    p, q, t = val * (1 - sat), val * (1 - sat * frac), val * (1 - sat * (1 - frac))
    sector = sector.long() % 6
    channels = []
    for order in ((val, q, p, p, t, val), (t, val, val, q, p, p), (p, p, t, val, val, q)):  # r, g, b per sector
        out = torch.zeros_like(val)
        for k, value in enumerate(order):
            out = torch.where(sector == k, value, out)
        channels.append(out)
    return torch.stack(channels, 1)


class ColourJitterView:
    """UniMatch's strong view of its medical (ACDC) code: with probability `prob` torchvision's
    ColorJitter(brightness, contrast, saturation, hue) (each factor drawn per image, the four applied in a random
    order per image, as ColorJitter does), then with probability `blur` a Gaussian blur of sigma uniform in `sigma`
    (theirs PIL's GaussianBlur of that radius).

    Images are mapped from their own range (per image, min to max: [-1, 1] after the percentile scaling) to [0, 1],
    jittered with ColorJitter's clamping, and mapped back. Saturation and hue change only 3-channel (RGB) images, as
    on theirs, which are grey. Every draw comes from the caller's generator.
    """

    def __init__(self, *, prob: float = 0.8, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.5,
                 hue: float = 0.25, blur: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0)):
        self.prob, self.blur, self.sigma = prob, blur, sigma
        self.ranges = (brightness, contrast, saturation, hue)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n, c, spatial = len(x), x.shape[1], x.ndim - 2
        shape = (n, *[1] * (x.ndim - 1))
        low = x.flatten(1).amin(1).view(shape)
        span = (x.flatten(1).amax(1).view(shape) - low).clamp_min(1e-7)
        u = (x - low) / span
        jitter = torch.rand(n, generator=generator) < self.prob
        factors = [1 + (2 * torch.rand(n, generator=generator) - 1) * r for r in self.ranges[:3]]
        factors.append((2 * torch.rand(n, generator=generator) - 1) * self.ranges[3])
        order = torch.rand(n, 4, generator=generator).argsort(1)  # a random order of the four per image
        blur = torch.rand(n, generator=generator) < self.blur
        sigmas = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(n, generator=generator)

        def grey(v: Tensor) -> Tensor:
            if c != 3:
                return v
            return (0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2]).unsqueeze(1)

        def apply(op: int, v: Tensor, f: Tensor) -> Tensor:
            f = f.to(v).view(len(v), *[1] * (v.ndim - 1))
            if op == 0:  # brightness
                return (v * f).clamp(0, 1)
            if op == 1:  # contrast: towards the mean grey level
                return (f * v + (1 - f) * grey(v).mean(dim=tuple(range(1, v.ndim)), keepdim=True)).clamp(0, 1)
            if c != 3:
                return v
            if op == 2:  # saturation: towards the grey image
                return (f * v + (1 - f) * grey(v)).clamp(0, 1)
            hsv = rgb_to_hsv(v)
            return hsv_to_rgb(torch.cat([(hsv[:, :1] + f) % 1.0, hsv[:, 1:]], 1))

        for position in range(4):
            for op in range(4):
                chosen = (jitter & (order[:, position] == op)).nonzero().flatten().to(x.device)
                if len(chosen):
                    u[chosen] = apply(op, u[chosen], factors[op][chosen.cpu()])
        for i in blur.nonzero().flatten().tolist():
            u[i] = GaussianFilter(spatial, float(sigmas[i]))(u[i:i + 1])[0]
        return torch.empty_like(x).copy_(u * span + low)
