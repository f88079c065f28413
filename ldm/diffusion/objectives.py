"""What the denoiser is trained to predict, how each timestep's loss is weighted, and the noise it sees."""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.denoiser import PREDICTIONS, check_prediction  # noqa: F401  (re-exported)
from ldm.diffusion.schedule import NoiseSchedule

WEIGHTINGS = ("uniform", "min_snr")


def diffusion_target(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor, prediction: str = "eps") -> Tensor:
    """ε for eps-prediction; v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 for v-prediction (Salimans & Ho 2022); x_0 for x0."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    alpha_bar = schedule.alpha_bar(t, x0.ndim).to(x0.dtype)
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def loss_weight(
    schedule: NoiseSchedule,
    t: Tensor,
    weighting: str = "uniform",
    gamma: float = 5.0,
    prediction: str = "eps",
) -> Tensor:
    """Per-sample weight (B,) on the MSE of `prediction`.

    Min-SNR-γ (Hang et al. 2023) weights the x_0 error by min(SNR, γ). An ε error is SNR times an x_0
    error and a v error is (SNR + 1) times one, so the weight on the predicted quantity is
    min(SNR, γ) / SNR for ε (written min(1, γ / SNR), which is 1 at SNR = 0, its limit),
    min(SNR, γ) / (SNR + 1) for v and min(SNR, γ) for x0. All stay finite on a zero-terminal-SNR schedule.
    """
    check_prediction(prediction)
    if weighting == "uniform":
        return torch.ones(t.shape, device=t.device)
    if weighting != "min_snr":
        raise ValueError(f"Unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
    snr = schedule.snr(t)
    if prediction == "eps":
        return gamma / snr.clamp(min=gamma)
    if prediction == "x0":
        return snr.clamp(max=gamma)
    return snr.clamp(max=gamma) / (snr + 1)


def _device_for(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def sample_timesteps(
    batch: int, num_timesteps: int, device: torch.device | str, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform integer timesteps in [0, num_timesteps), drawn on the generator's device."""
    draw_device = _device_for(generator, torch.device(device))
    return torch.randint(0, num_timesteps, (batch,), generator=generator, device=draw_device).to(device)


def offset_noise(like: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """ε + strength · (one Gaussian per sample and channel), so the model learns to shift the mean
    brightness of an image (Guttenberg 2023); strength 0.1 is the usual choice."""
    draw_device = _device_for(generator, like.device)
    noise = torch.randn(like.shape, generator=generator, device=draw_device, dtype=like.dtype)
    per_channel = torch.randn(like.shape[:2] + (1,) * (like.ndim - 2), generator=generator, device=draw_device, dtype=like.dtype)
    return (noise + strength * per_channel).to(like.device)
