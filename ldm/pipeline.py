"""Text-to-image, img2img and inpainting in latent space: noise -> sampler over a (guided) UNet -> decode.

The functions here take any object shaped like `LatentDiffusionModule` (see `LatentDiffusionModel`):
this module imports nothing of Lightning or of `ldm.training`, so the module itself can call it.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.diffusion.guidance import ClassifierFreeGuidance


class LatentDiffusionModel(Protocol):
    """What sampling needs from a trained stage-2 model."""

    unet: nn.Module
    ema: Any
    autoencoder: Any
    scale_factor: Tensor
    device: torch.device

    def encode_text(self, captions: list[str]) -> Tensor: ...

    def decode_latents(self, z: Tensor) -> Tensor: ...


STEP_NOISE_SEED_OFFSET = 2**32
"""Keeps each image's per-step noise stream apart from the stream its starting noise came from."""


def guided_model(
    unet: nn.Module,
    context: Tensor,
    uncond: Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The denoiser a sampler sees. Scale 1 is plain conditional sampling (one forward, no uncond pass)."""
    if guidance_scale == 1.0:
        return lambda x, t: unet(x, t, context)
    return ClassifierFreeGuidance(unet, context, uncond, guidance_scale, guidance_rescale, guidance_interval)


def denoise_latents(
    unet: nn.Module,
    sampler: Any,
    context: Tensor,
    uncond: Tensor,
    guidance_scale: float,
    x_T: Tensor,
    generator: torch.Generator | None = None,
    *,
    x0: Tensor | None = None,
    strength: float = 1.0,
    mask: Tensor | None = None,
    progress: bool = False,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
) -> Tensor:
    """Runs `sampler` from the noise `x_T` over the guided UNet; img2img and inpainting as in `Sampler.sample`."""
    model = guided_model(unet, context, uncond, guidance_scale, guidance_rescale, guidance_interval)
    return sampler.sample(model, x_T, generator=generator, progress=progress, x0=x0, strength=strength, mask=mask)


def check_image_size(height: int, width: int, factor: int) -> None:
    """Images must map onto whole latent pixels."""
    bad = [f"{name}={value}" for name, value in (("H", height), ("W", width)) if value <= 0 or value % factor]
    if bad:
        raise ValueError(f"{' and '.join(bad)}: image height and width must be positive multiples of {factor} (the autoencoder's downsampling factor).")


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    """One unit-noise tensor of `shape` per seed, stacked. Drawn on the CPU, so image k of a run is the
    same whatever the batch size and whether it runs on a CPU or a GPU."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(noise).to(device)


@torch.no_grad()
def encode_init_image(model: LatentDiffusionModel, image: Tensor) -> Tensor:
    """Scaled posterior mean of `image` (B x 3 x H x W in [-1, 1]): the deterministic latent of an init image."""
    with torch.autocast(model.device.type, enabled=False):
        mean = model.autoencoder.encode(image.to(model.device).float()).mode()
    return mean * model.scale_factor.float()


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """A pixel mask (B x 1 x H x W, 1 = regenerate) at latent resolution: a latent pixel is regenerated if
    any image pixel it covers is, so the kept latents only ever cover pixels the user asked to keep."""
    return (F.max_pool2d(mask.float(), kernel_size=factor, stride=factor) > 0.5).float()


@torch.no_grad()
def generate_images(
    model: LatentDiffusionModel,
    sampler: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    height: int,
    width: int,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    negative_prompt: str = "",
    use_ema: bool = True,
    init_image: Tensor | None = None,
    strength: float = 1.0,
    mask: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Images in [-1, 1], one per (prompt, seed).

    Text-to-image by default. With `init_image` (1 or B x 3 x height x width in [-1, 1]): img2img at
    `strength` (0 gives back the autoencoder's reconstruction of the init image, 1 the text-to-image
    sample of the same seed). With `mask` too (1 x 1 x height x width in [0, 1], 1 = regenerate):
    inpainting of the masked region, the rest kept.

    Image k's starting noise, and the fresh noise stochastic samplers (DDPM, DDIM with eta > 0, Euler
    ancestral) add at each step, come from `seeds[k]` alone, so an image does not depend on its batch.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if init_image is None and (mask is not None or strength < 1.0):
        raise ValueError("img2img (strength < 1) and inpainting (mask) need an init image")
    factor = model.autoencoder.downsample_factor
    check_image_size(height, width, factor)
    device = model.device
    x_T = seeded_noise(seeds, (model.autoencoder.latent_channels, height // factor, width // factor), device)
    x0 = latents_mask = None
    if init_image is not None:
        _check_spatial(init_image, height, width, "init image")
        x0 = encode_init_image(model, init_image).expand_as(x_T)
    if mask is not None:
        _check_spatial(mask, height, width, "mask")
        latents_mask = latent_mask(mask.to(device), factor)
    context = model.encode_text(list(prompts))
    uncond = model.encode_text([negative_prompt] * len(prompts))
    unet = model.ema.module if use_ema else model.unet
    generator = [torch.Generator(device=device).manual_seed(STEP_NOISE_SEED_OFFSET + int(seed)) for seed in seeds]
    z = denoise_latents(
        unet, sampler, context, uncond, guidance_scale, x_T, generator, x0=x0, strength=strength, mask=latents_mask,
        progress=progress, guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
    )
    return model.decode_latents(z)


def _check_spatial(image: Tensor, height: int, width: int, what: str) -> None:
    if tuple(image.shape[-2:]) != (height, width):
        raise ValueError(f"The {what} is {image.shape[-1]}x{image.shape[-2]} (W x H); expected {width}x{height}.")
