"""Text-to-image in latent space: noise -> sampler over a (guided) UNet -> latents."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ldm.diffusion.guidance import ClassifierFreeGuidance


def guided_model(unet: nn.Module, context: Tensor, uncond: Tensor, guidance_scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The denoiser a sampler sees. Scale 1 is plain conditional sampling (one forward, no uncond pass)."""
    if guidance_scale == 1.0:
        return lambda x, t: unet(x, t, context)
    return ClassifierFreeGuidance(unet, context, uncond, guidance_scale)


def generate_latents(
    unet: nn.Module,
    sampler: Any,
    context: Tensor,
    uncond: Tensor,
    guidance_scale: float,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str,
    progress: bool = False,
) -> Tensor:
    x_T = torch.randn(shape, generator=generator, device=device)
    model = guided_model(unet, context, uncond, guidance_scale)
    return sampler.sample(model, x_T, generator=generator, progress=progress)
