"""Gaussian diffusion: beta schedules, forward noising, x0/eps conversions, DDIM sampling."""

from superdiffusion.diffusion.gaussian import SCHEDULES, GaussianDiffusion, beta_schedule

__all__ = ["SCHEDULES", "GaussianDiffusion", "beta_schedule"]
