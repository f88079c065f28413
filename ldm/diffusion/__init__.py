"""Noise schedules, training objectives, samplers and guidance; no Lightning, no datasets."""

from ldm.diffusion.denoiser import PREDICTIONS, Denoiser
from ldm.diffusion.guidance import ClassifierFreeGuidance
from ldm.diffusion.objectives import (
    diffusion_target,
    loss_weight,
    offset_noise,
    sample_timesteps,
)
from ldm.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverMultistepSampler,
    EulerAncestralSampler,
    EulerSampler,
    Sampler,
    build_sampler,
    timesteps_for,
)
from ldm.diffusion.schedule import NoiseSchedule

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverMultistepSampler",
    "Denoiser",
    "EulerAncestralSampler",
    "EulerSampler",
    "NoiseSchedule",
    "Sampler",
    "build_sampler",
    "diffusion_target",
    "loss_weight",
    "offset_noise",
    "sample_timesteps",
    "timesteps_for",
]
