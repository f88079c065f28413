"""Samplers that step between discrete DDPM timesteps in the variance-preserving scale."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers.base import Sampler, randn, timesteps_for
from ldm.diffusion.schedule import NoiseSchedule


def default_spacing(schedule: NoiseSchedule) -> str:
    """"leading" (Stable Diffusion's) unless the schedule has zero terminal SNR: then "trailing", the
    only integer grid that starts at t = T - 1, where the model learnt to draw from pure noise and
    from the prompt alone (Lin et al. 2023, section 3.3)."""
    return "trailing" if schedule.zero_terminal_snr else "leading"


class _DiscreteSampler(Sampler):
    """Integer timesteps on the chosen spacing (None: `default_spacing`); the last step lands on
    ᾱ = 1 (the clean sample)."""

    def __init__(self, schedule: NoiseSchedule, steps: int, spacing: str | None = None, steps_offset: int = 0) -> None:
        spacing = spacing or default_spacing(schedule)
        super().__init__(schedule, steps, spacing, steps_offset)
        self.timesteps = timesteps_for(schedule, steps, spacing, steps_offset).round()
        table = schedule.alphas_cumprod_f64
        self.alpha_bars = [float(table[int(t)]) for t in self.timesteps] + [1.0]
        self.state_scales = [1.0] * (steps + 1)


class DDPMSampler(_DiscreteSampler):
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x_0) with the "fixed small"
    variance (Ho et al. 2020), over a possibly strided grid, as diffusers' DDPMScheduler."""

    name = "ddpm"

    def __init__(self, schedule: NoiseSchedule, steps: int = 1000, spacing: str | None = None, steps_offset: int = 0) -> None:
        super().__init__(schedule, steps, spacing, steps_offset)
        self.coefficients = []
        for i in range(steps):
            alpha_bar, alpha_bar_prev = self.alpha_bars[i], self.alpha_bars[i + 1]
            beta = 1 - alpha_bar / alpha_bar_prev
            x0_coef = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
            x_coef = math.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar)
            std = math.sqrt(max((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, 1e-20))
            self.coefficients.append((x0_coef, x_coef, std, bool(self.timesteps[i] > 0)))

    def step(self, denoiser: Denoiser, x: Tensor, t: Tensor, i: int, previous: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        x0_coef, x_coef, std, add_noise = self.coefficients[i]
        x0, _ = denoiser.predict(x, t, self.alpha_bars[i])
        x_prev = x0_coef * x0 + x_coef * x
        if add_noise:
            x_prev = x_prev + std * randn(x, generator)
        return x_prev, x0


class DDIMSampler(_DiscreteSampler):
    """DDIM (Song et al. 2021): eta = 0 is deterministic, eta = 1 has DDPM's posterior variance.

    Steps go to the next timestep on the grid. (diffusers' DDIMScheduler steps to
    t - num_timesteps // steps instead, which is the same grid for "leading" and for "trailing" when
    `steps` divides num_timesteps, and off the grid otherwise.)
    """

    name = "ddim"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int = 50,
        eta: float = 0.0,
        spacing: str | None = None,
        steps_offset: int = 0,
    ) -> None:
        super().__init__(schedule, steps, spacing, steps_offset)
        self.eta = eta
        self.coefficients = []
        for i in range(steps):
            alpha_bar, alpha_bar_prev = self.alpha_bars[i], self.alpha_bars[i + 1]
            variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
            std = eta * math.sqrt(variance)
            direction = math.sqrt(max(1 - alpha_bar_prev - std**2, 0.0))
            self.coefficients.append((math.sqrt(alpha_bar_prev), direction, std))

    def step(self, denoiser: Denoiser, x: Tensor, t: Tensor, i: int, previous: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        x0_coef, eps_coef, std = self.coefficients[i]
        x0, eps = denoiser.predict(x, t, self.alpha_bars[i])
        x_prev = x0_coef * x0 + eps_coef * eps
        if self.eta > 0:
            x_prev = x_prev + std * randn(x, generator)
        return x_prev, x0
