"""Euler and Euler-ancestral over k-diffusion sigmas (Karras et al. 2022).

The state is x = x_t · sqrt(1 + sigma²), in which the probability-flow ODE is dx/dsigma = (x - x̂_0) / sigma;
the model still sees the variance-preserving x_t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers.base import (
    Sampler,
    interp_sigmas,
    karras_sigmas,
    randn,
    timesteps_for,
    timesteps_from_sigmas,
)
from ldm.diffusion.schedule import NoiseSchedule


class _SigmaSampler(Sampler):
    """Sigmas interpolated at the spaced timesteps (or a Karras ramp between their ends), then 0."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int,
        spacing: str = "linspace",
        karras: bool = False,
        steps_offset: int = 0,
    ) -> None:
        super().__init__(schedule, steps, spacing, steps_offset)
        self.karras = karras
        timesteps = timesteps_for(schedule, steps, spacing, steps_offset)
        sigmas = interp_sigmas(schedule, timesteps)
        if karras:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
            timesteps = timesteps_from_sigmas(schedule, sigmas)
        self.timesteps = timesteps
        self.sigmas = [float(s) for s in sigmas] + [0.0]
        self.alpha_bars = [1 / (1 + s**2) for s in self.sigmas]
        self.state_scales = [math.sqrt(1 + s**2) for s in self.sigmas]
        # diffusers' convention: "leading" starts from unit-variance x_t, the others from sigma_max · noise.
        sigma_max = max(self.sigmas)
        self.init_noise_sigma = math.sqrt(sigma_max**2 + 1) if spacing == "leading" else sigma_max


class EulerSampler(_SigmaSampler):
    """The first-order Euler step of the probability-flow ODE (k-diffusion's sample_euler)."""

    name = "euler"

    def __init__(self, schedule: NoiseSchedule, steps: int = 30, spacing: str = "linspace", karras: bool = False, steps_offset: int = 0) -> None:
        super().__init__(schedule, steps, spacing, karras, steps_offset)

    def step(self, denoiser: Denoiser, x: Tensor, t: Tensor, i: int, previous: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        denoised = denoiser.denoise(x, t, sigma)
        return x + (x - denoised) / sigma * (sigma_next - sigma), denoised


class EulerAncestralSampler(_SigmaSampler):
    """Euler down to sigma_down, then fresh noise up to sigma_next (k-diffusion's sample_euler_ancestral, eta 1)."""

    name = "euler_a"

    def __init__(self, schedule: NoiseSchedule, steps: int = 30, spacing: str = "linspace", karras: bool = False, steps_offset: int = 0) -> None:
        super().__init__(schedule, steps, spacing, karras, steps_offset)
        self.ancestral = []
        for sigma, sigma_next in zip(self.sigmas[:-1], self.sigmas[1:]):
            sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_down = sigma_next**2 / sigma
            self.ancestral.append((sigma_down, sigma_up))

    def step(self, denoiser: Denoiser, x: Tensor, t: Tensor, i: int, previous: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        sigma = self.sigmas[i]
        sigma_down, sigma_up = self.ancestral[i]
        denoised = denoiser.denoise(x, t, sigma)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        return x + sigma_up * randn(x, generator), denoised
