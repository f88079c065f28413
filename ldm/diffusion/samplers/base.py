"""What every sampler shares: timestep grids, the sampling loop, img2img and inpainting.

A sampler walks a fixed grid of noise levels from noisy to clean. All per-step numbers are computed
once on the host in float64 when the sampler is built, so the loop only does tensor arithmetic with
Python floats: no host synchronisation and no branching on tensor values.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedule import NoiseSchedule

Callback = Callable[[int, Tensor], None]

SPACINGS = ("leading", "trailing", "linspace")


def timesteps_for(schedule: NoiseSchedule, steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
    """Descending float64 DDPM timesteps for `steps` sampling steps (Lin et al. 2023, Table 2).

    "leading" and "trailing" give integers; "linspace" gives evenly spaced, possibly fractional
    timesteps, which discrete samplers round and the Euler family uses as they are.
    """
    total = schedule.num_timesteps
    if not 0 < steps <= total:
        raise ValueError(f"steps must be in [1, {total}], got {steps}")
    index = torch.arange(steps, dtype=torch.float64)
    if spacing == "linspace":
        if steps == 1:
            return torch.zeros(1, dtype=torch.float64)
        ascending = index * ((total - 1) / (steps - 1))
        ascending[-1] = total - 1
        return ascending.flip(0)
    if spacing == "leading":
        return (index * (total // steps) + steps_offset).flip(0)
    if spacing == "trailing":
        return torch.round(total - index * (total / steps)) - 1
    raise ValueError(f"Unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")


def sigma_table(schedule: NoiseSchedule) -> Tensor:
    """k-diffusion sigmas sqrt((1 - ᾱ) / ᾱ) in float64, with ᾱ floored at 2^-24 (as diffusers does)
    so that a zero-terminal-SNR schedule gives a large but finite sigma_max."""
    alpha_bar = schedule.alphas_cumprod_f64.clamp(min=2.0**-24)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def interp_sigmas(schedule: NoiseSchedule, timesteps: Tensor) -> Tensor:
    """Sigma at (possibly fractional) timesteps, linear between the integer entries."""
    table = sigma_table(schedule)
    low = timesteps.floor().clamp(0, len(table) - 1)
    high = (low + 1).clamp(max=len(table) - 1)
    frac = timesteps - low
    return table[low.long()] * (1 - frac) + table[high.long()] * frac


def timesteps_from_sigmas(schedule: NoiseSchedule, sigmas: Tensor) -> Tensor:
    """The fractional timestep whose sigma is `sigma`, interpolating linearly in log sigma."""
    log_table = sigma_table(schedule).log()
    log_sigma = sigmas.clamp(min=1e-10).log()
    low = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(log_table) - 2)
    high = low + 1
    weight = ((log_table[low] - log_sigma) / (log_table[low] - log_table[high])).clamp(0, 1)
    return (1 - weight) * low + weight * high


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: `steps` sigmas from sigma_max down to sigma_min."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def randn(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """Gaussian noise shaped like x, drawn on the generator's device (as diffusers draws it).

    A sequence of generators draws row k of the batch from generator k, so an image's noise does not
    depend on which batch it was sampled in.
    """
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([randn(x[k : k + 1], g) for k, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class Sampler(ABC):
    """A grid of `steps` model evaluations from noise to data.

    Subclasses set, in float64 on the host:
      timesteps       (steps,) the DDPM timestep the model is called with at each step;
      alpha_bars      steps + 1 floats, the ᾱ of the state before each step and, last, 1.0 (clean);
      state_scales    steps + 1 floats: the sampler's state is the variance-preserving x_t times this
                      (1 for DDPM/DDIM/DPM-Solver, sqrt(1 + sigma²) for the Euler family);
      init_noise_sigma  what unit noise is multiplied by to start from pure noise;
    and implement `step`. The network's parameterisation (eps, v, x0) is the `Denoiser`'s business.
    """

    name: str
    """The sampler's name in the `sampler` config group and in PNG metadata."""
    timesteps: Tensor
    alpha_bars: list[float]
    state_scales: list[float]
    init_noise_sigma: float = 1.0

    def __init__(self, schedule: NoiseSchedule, steps: int, spacing: str = "leading", steps_offset: int = 0) -> None:
        if spacing not in SPACINGS:
            raise ValueError(f"Unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
        self.schedule = schedule
        self.steps = steps
        self.spacing = spacing
        self.steps_offset = steps_offset

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, spacing={self.spacing!r})"

    @abstractmethod
    def step(self, denoiser: Denoiser, x: Tensor, t: Tensor, i: int, previous: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """One step from grid point i to i + 1. Returns the new state and the denoiser's x_0 estimate
        (multistep solvers get the previous step's estimate back as `previous`)."""

    def start_step(self, strength: float) -> int:
        """The first step run for img2img `strength` in [0, 1] (the diffusers convention)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        return self.steps - min(int(self.steps * strength), self.steps)

    def noised(self, x0: Tensor, noise: Tensor, i: int) -> Tensor:
        """x0 noised to grid point i, in the variance-preserving scale; exactly x0 at the end."""
        alpha_bar = self.alpha_bars[i]
        return math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise

    def sample(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = True,
        *,
        x0: Tensor | None = None,
        strength: float = 1.0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Denoise unit-variance noise `x_T` into a sample.

        img2img: pass `x0` and `strength` < 1; the walk starts at the grid point a fraction
        `strength` from the end, from x0 noised with x_T. Strength 0 returns x0, strength 1 starts
        from pure noise (the text-to-image sample for the same x_T; the first grid level is not
        pure noise unless the schedule has zero terminal SNR, so x0 is not mixed in there).
        Inpainting: pass `x0` and `mask` (1 = generate, 0 = keep, broadcastable to x_T). After every
        step the kept region is replaced by x0 noised with x_T to the new level, so it ends as x0.
        `callback(i, x)` sees the variance-preserving latent after step i.
        """
        if x0 is None and (strength < 1.0 or mask is not None):
            raise ValueError("img2img (strength < 1) and inpainting (mask) need x0")
        start = self.start_step(strength)
        if start == 0:
            x = x_T * self.init_noise_sigma
        else:
            x = self.noised(x0, x_T, start) * self.state_scales[start]
        if mask is not None:
            x = self._keep(x, x0, x_T, mask, start)
        timesteps = self.timesteps.to(device=x_T.device, dtype=torch.float32)
        previous = None
        for i in tqdm(range(start, self.steps), disable=not progress, desc=type(self).__name__, leave=False):
            t = timesteps[i].expand(x.shape[0])
            x, previous = self.step(denoiser, x, t, i, previous, generator)
            if mask is not None:
                x = self._keep(x, x0, x_T, mask, i + 1)
            if callback is not None:
                callback(i, x / self.state_scales[i + 1])
        return x / self.state_scales[self.steps]

    def _keep(self, x: Tensor, x0: Tensor, noise: Tensor, mask: Tensor, i: int) -> Tensor:
        known = self.noised(x0, noise, i) * self.state_scales[i]
        return mask * x + (1 - mask) * known
