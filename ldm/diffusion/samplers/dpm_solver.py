"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver in log-SNR time, on x_0 estimates."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers.base import (
    Sampler,
    interp_sigmas,
    karras_sigmas,
    sigma_table,
    timesteps_for,
    timesteps_from_sigmas,
)
from ldm.diffusion.schedule import NoiseSchedule


def _dpm_timesteps(schedule: NoiseSchedule, steps: int, spacing: str, steps_offset: int) -> Tensor:
    """diffusers' grid for this solver: "linspace" and "leading" space steps + 1 points and drop t = 0,
    since the final step goes to sigma = 0 anyway; "trailing" is the usual trailing grid."""
    if spacing == "trailing":
        return timesteps_for(schedule, steps, spacing, steps_offset)
    return timesteps_for(schedule, steps + 1, spacing, steps_offset)[:-1].round()


class DPMSolverMultistepSampler(Sampler):
    """DPM-Solver++(2M): first order on the first step run and on the last (to sigma = 0), second
    order in between, as diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2).

    With sigma_k the k-diffusion sigma, α = 1 / sqrt(1 + sigma²), σ = sigma · α and λ = -log sigma, one step from
    s to t with h = λ_t - λ_s is x_t = (σ_t / σ_s) x_s + α_t (1 - e^{-h}) D, where D is the x_0 estimate
    (first order) or (1 + 1/(2r)) x̂_0(s) - 1/(2r) x̂_0(s_prev) with r = h_prev / h (second order).
    """

    name = "dpmpp_2m"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int = 20,
        spacing: str = "linspace",
        karras: bool = False,
        steps_offset: int = 0,
    ) -> None:
        super().__init__(schedule, steps, spacing, steps_offset)
        self.karras = karras
        timesteps = _dpm_timesteps(schedule, steps, spacing, steps_offset)
        if karras:
            table = sigma_table(schedule)
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
            timesteps = timesteps_from_sigmas(schedule, sigmas).round()
        else:
            sigmas = interp_sigmas(schedule, timesteps)
        self.timesteps = timesteps
        self.sigmas = [float(s) for s in sigmas] + [0.0]
        self.alpha_bars = [1 / (1 + s**2) for s in self.sigmas]
        self.state_scales = [1.0] * (steps + 1)
        self.first_order = []
        self.second_order = []
        for i in range(steps):
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            alpha_next = math.sqrt(self.alpha_bars[i + 1])
            x_coef = sigma_next * alpha_next / (sigma * math.sqrt(self.alpha_bars[i]))
            d_coef = alpha_next * (1 - sigma_next / sigma)
            self.first_order.append((x_coef, d_coef, 0.0))
            if i == 0 or i == steps - 1:
                self.second_order.append(self.first_order[-1])
                continue
            r = math.log(self.sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)
            self.second_order.append((x_coef, d_coef * (1 + 1 / (2 * r)), -d_coef / (2 * r)))

    def step(self, denoiser: Denoiser, x: Tensor, t: Tensor, i: int, previous: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        x0, _ = denoiser.predict(x, t, self.alpha_bars[i])
        if previous is None:
            x_coef, d_coef, _ = self.first_order[i]
            return x_coef * x + d_coef * x0, x0
        x_coef, d_coef, previous_coef = self.second_order[i]
        return x_coef * x + d_coef * x0 + previous_coef * previous, x0
