"""Samplers over a `Denoiser` (a network and its eps / v / x0 parameterisation); `build_sampler` picks one by name."""

from __future__ import annotations

from typing import Any

from ldm.diffusion.samplers.base import Callback, Sampler, karras_sigmas, timesteps_for
from ldm.diffusion.samplers.ddim import DDIMSampler, DDPMSampler
from ldm.diffusion.samplers.dpm_solver import DPMSolverMultistepSampler
from ldm.diffusion.samplers.euler import EulerAncestralSampler, EulerSampler
from ldm.diffusion.schedule import NoiseSchedule

SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDPMSampler, DDIMSampler, EulerSampler, EulerAncestralSampler, DPMSolverMultistepSampler)
}


def build_sampler(name: str, schedule: NoiseSchedule, steps: int, **kwargs: Any) -> Sampler:
    """The sampler called `name` (one of SAMPLERS) over `schedule` with `steps` model evaluations."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](schedule, steps, **kwargs)


__all__ = [
    "SAMPLERS",
    "Callback",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverMultistepSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "Sampler",
    "build_sampler",
    "karras_sigmas",
    "timesteps_for",
]
