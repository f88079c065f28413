"""Text-to-image, img2img and inpainting in latent space: noise -> sampler over a (guided) denoiser -> decode."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import ClassifierFreeGuidance
from ldm.diffusion.samplers import Sampler
from ldm.inference.model import LatentDiffusionModel

STEP_NOISE_SEED_OFFSET = 2**32
"""Keeps each image's per-step noise stream apart from the stream its starting noise came from."""


def guided_network(
    unet: nn.Module,
    context: Tensor,
    uncond: Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The network a denoiser wraps: the UNet with its conditioning bound, guided unless the scale is 1
    (plain conditional sampling: one forward, no unconditional pass)."""
    if guidance_scale == 1.0:
        return lambda x, t: unet(x, t, context)
    return ClassifierFreeGuidance(unet, context, uncond, guidance_scale, guidance_rescale, guidance_interval)


def denoise_latents(
    unet: nn.Module,
    sampler: Sampler,
    context: Tensor,
    uncond: Tensor,
    guidance_scale: float,
    x_T: Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    *,
    prediction: str,
    x0: Tensor | None = None,
    strength: float = 1.0,
    mask: Tensor | None = None,
    progress: bool = False,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
) -> Tensor:
    """Runs `sampler` from the noise `x_T` over the guided UNet, which predicts `prediction` (eps, v or
    x0); img2img and inpainting as in `Sampler.sample`."""
    network = guided_network(unet, context, uncond, guidance_scale, guidance_rescale, guidance_interval)
    denoiser = Denoiser(network, prediction)
    return sampler.sample(denoiser, x_T, generator=generator, progress=progress, x0=x0, strength=strength, mask=mask)


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


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """A pixel mask (B x 1 x H x W, 1 = regenerate) at latent resolution: a latent pixel is regenerated if
    any image pixel it covers is, so the kept latents only ever cover pixels the user asked to keep."""
    return (F.max_pool2d(mask.float(), kernel_size=factor, stride=factor) > 0.5).float()


@torch.no_grad()
def generate_images(
    model: LatentDiffusionModel,
    sampler: Sampler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    height: int,
    width: int,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    negative_prompt: str = "",
    init_image: Tensor | None = None,
    strength: float = 1.0,
    mask: Tensor | None = None,
    progress: bool = False,
    decode: bool = True,
) -> Tensor:
    """Images in [-1, 1], one per (prompt, seed); with `decode=False`, their scaled latents.

    Text-to-image by default. With `init_image` (1 or B x 3 x height x width in [-1, 1]): img2img at
    `strength` (0 gives back the autoencoder's reconstruction of the init image, 1 the text-to-image
    sample of the same seed). With `mask` too (1 x 1 x height x width in [0, 1], 1 = regenerate):
    inpainting of the masked region, the rest kept.

    Image k's starting noise, and the fresh noise stochastic samplers (DDPM, DDIM with eta > 0, Euler
    ancestral) add at each step, come from `seeds[k]` alone, so an image does not depend on its batch.
    The UNet is `model.unet`: the EMA weights when the model was loaded with `use_ema=True`.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if init_image is None and (mask is not None or strength < 1.0):
        raise ValueError("img2img (strength < 1) and inpainting (mask) need an init image")
    codec = model.codec
    check_image_size(height, width, codec.downsample_factor)
    device = model.device
    x_T = seeded_noise(seeds, codec.latent_shape(height, width), device)
    x0 = latents_mask = None
    if init_image is not None:
        _check_spatial(init_image, height, width, "init image")
        x0 = codec.encode(init_image, sample=False).expand_as(x_T)
    if mask is not None:
        _check_spatial(mask, height, width, "mask")
        latents_mask = latent_mask(mask.to(device), codec.downsample_factor)
    context = model.encode_text(list(prompts))
    uncond = model.encode_text([negative_prompt] * len(prompts))
    generator = [torch.Generator(device=device).manual_seed(STEP_NOISE_SEED_OFFSET + int(seed)) for seed in seeds]
    z = denoise_latents(
        model.unet, sampler, context, uncond, guidance_scale, x_T, generator, prediction=model.prediction,
        x0=x0, strength=strength, mask=latents_mask, progress=progress,
        guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
    )
    return codec.decode(z) if decode else z


def _check_spatial(image: Tensor, height: int, width: int, what: str) -> None:
    if tuple(image.shape[-2:]) != (height, width):
        raise ValueError(f"The {what} is {image.shape[-1]}x{image.shape[-2]} (W x H); expected {width}x{height}.")
