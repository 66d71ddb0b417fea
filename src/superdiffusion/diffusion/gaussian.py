"""Gaussian diffusion maths for the teacher (METHOD.md sections 1, 4, 5), 2D and 3D alike.

In the style of lucidrains' denoising-diffusion-pytorch: beta schedules, forward noising, the
x0 <-> eps conversions and deterministic DDIM (eta = 0) sampling for an x0-predicting model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from superdiffusion.errors import InputError

SCHEDULES = ("linear", "cosine", "sigmoid")


def _betas_from_abar(abar: Tensor) -> Tensor:
    abar = abar / abar[0]
    return torch.clip(1 - abar[1:] / abar[:-1], 0, 0.999)


def beta_schedule(name: str, timesteps: int) -> Tensor:
    """Betas (float64, length `timesteps`) of the named schedule: "linear", "cosine" or "sigmoid"."""
    if timesteps < 1:
        raise InputError(f"diffusion timesteps must be >= 1, got {timesteps}")
    T = timesteps
    if name == "linear":  # Ho et al. 2020 scaled by 1000 / T; clipped like the others (bites for T < 21)
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clip(0, 0.999)
    s = torch.linspace(0, 1, T + 1, dtype=torch.float64)
    if name == "cosine":  # Nichol & Dhariwal 2021
        return _betas_from_abar(torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    if name == "sigmoid":  # lucidrains' sigmoid_beta_schedule(start=-3, end=3, tau=1), the reference's
        start, end = -3.0, 3.0
        v_start, v_end = torch.tensor(start).sigmoid(), torch.tensor(end).sigmoid()
        abar = (v_end - (s * (end - start) + start).sigmoid()) / (v_end - v_start)
        return _betas_from_abar(abar)
    raise InputError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


class GaussianDiffusion(nn.Module):
    """Noise schedule buffers plus q_sample, x0/eps conversions and DDIM sampling."""

    def __init__(self, *, timesteps: int = 1000, schedule: str = "sigmoid"):
        super().__init__()
        betas = beta_schedule(schedule, timesteps)
        abar = torch.cumprod(1 - betas, dim=0)
        self.timesteps, self.schedule = timesteps, schedule
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", abar.float())
        self.register_buffer("sqrt_alphas_cumprod", abar.sqrt().float())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - abar).sqrt().float())

    @staticmethod
    def _bcast(v: Tensor, x: Tensor) -> Tensor:
        """Per-sample values (B,) -> (B, 1, ...) to broadcast against x; scalars stay scalars."""
        return (v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v).to(x)

    def _extract(self, a: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
        """a[t] shaped to broadcast against x."""
        return self._bcast(a[torch.as_tensor(t, device=a.device)], x)

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return ((x_t - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps)
                / self._extract(self.sqrt_alphas_cumprod, t, x_t))

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        return ((x_t - self._extract(self.sqrt_alphas_cumprod, t, x_t) * x0)
                / self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t))

    def sample_timesteps(self, batch: int, *, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
        """Per-sample steps, uniform in 0..T-1 (LongTensor of shape (batch,))."""
        gen_device = generator.device if generator is not None else device or self.betas.device
        t = torch.randint(0, self.timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device or self.betas.device)

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` evenly spaced steps from T-1 down to 0 (just [T-1] for one step)."""
        if not 1 <= steps <= self.timesteps:
            raise InputError(f"DDIM steps must be in 1..{self.timesteps}, got {steps}")
        if steps == 1:
            return [self.timesteps - 1]
        span = self.timesteps - 1
        return [math.floor(span * (steps - 1 - i) / (steps - 1) + 0.5) for i in range(steps)]

    def ddim_step(self, x_t: Tensor, t: Tensor | int, x0_pred: Tensor, t_next: Tensor | int) -> Tensor:
        """Deterministic DDIM (eta = 0) move from t to t_next; t_next = -1 gives x0_pred itself."""
        eps = self.predict_eps_from_x0(x_t, t, x0_pred)
        t_next = torch.as_tensor(t_next, device=self.betas.device)
        abar_next = torch.where(t_next >= 0, self.alphas_cumprod[t_next.clamp(min=0)], 1.0)
        abar_next = self._bcast(abar_next, x_t)
        return abar_next.sqrt() * x0_pred + (1 - abar_next).sqrt() * eps

    @torch.no_grad()
    def ddim_sample(self, denoise_x0: Callable[[Tensor, Tensor], Tensor], shape: Sequence[int], *,
                    steps: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, x_T: Tensor | None = None,  # noqa: N803
                    clip: float | None = 1.0) -> Tensor:
        """k-step DDIM sampling with an x0-predicting `denoise_x0(x_t, t)`; returns the final x0."""
        device = torch.device(device) if device is not None else self.betas.device
        if x_T is None:
            gen_device = generator.device if generator is not None else device
            x_T = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=self.betas.dtype)
        x = x_T.to(device)
        ts = self.ddim_timesteps(steps)
        for t, t_next in zip(ts, [*ts[1:], -1]):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
            x0 = denoise_x0(x, tt)
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
            x = self.ddim_step(x, tt, x0, t_next)
        return x
