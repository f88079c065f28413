"""Generation in latent space: noise -> sampler over a (guided) denoiser -> decode. What the UNet is
conditioned on (a prompt, a class, nothing, an image to inpaint or to upsample) is the model's
conditioner's business; img2img and latent-blending inpainting work for any model whose conditioner does
not take the image itself."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import ClassifierFreeGuidance, Context
from ldm.diffusion.samplers import Sampler
from ldm.inference.model import LatentDiffusionModel
from ldm.modules.conditioning import SamplingRequest, unet_forward

STEP_NOISE_SEED_OFFSET = 2**32
"""Keeps each image's per-step noise stream apart from the stream its starting noise came from."""


def guided_network(
    unet: nn.Module,
    context: Context,
    uncond: Context,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The network a denoiser wraps: the UNet with its conditioning (a cross-attention context, or a
    conditioner's dict) bound, guided unless the scale is 1 (plain conditional sampling: one forward,
    no unconditional pass)."""
    if guidance_scale == 1.0:
        return lambda x, t: unet_forward(unet, x, t, context)
    model = unet if isinstance(context, Tensor) else (lambda x, t, c: unet_forward(unet, x, t, c))
    return ClassifierFreeGuidance(model, context, uncond, guidance_scale, guidance_rescale, guidance_interval)


def denoise_latents(
    unet: nn.Module,
    sampler: Sampler,
    context: Context,
    uncond: Context,
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
    prompts: Sequence[str] | None,
    seeds: Sequence[int],
    *,
    height: int,
    width: int,
    class_labels: Sequence[int] | None = None,
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
    """Images in [-1, 1], one per seed (and prompt, or class label); with `decode=False`, their scaled latents.

    The model's conditioner takes what it conditions on: `prompts` (text), `class_labels` (class), nothing
    (unconditional), or `init_image` and `mask` themselves (an inpainting model; a super-resolution model
    takes the low-resolution `init_image` and generates `height` x `width`). For any other model, text-to-image
    by default; with `init_image` (1 or B x 3 x height x width in [-1, 1]): img2img at
    `strength` (0 gives back the autoencoder's reconstruction of the init image, 1 the text-to-image
    sample of the same seed). With `mask` too (1 x 1 x height x width in [0, 1], 1 = regenerate):
    inpainting of the masked region by latent blending, the rest kept.

    Image k's starting noise, and the fresh noise stochastic samplers (DDPM, DDIM with eta > 0, Euler
    ancestral) add at each step, come from `seeds[k]` alone, so an image does not depend on its batch.
    The UNet is `model.unet`: the EMA weights when the model was loaded with `use_ema=True`.
    """
    for name, values in (("prompts", prompts), ("class labels", class_labels)):
        if values is not None and len(values) != len(seeds):
            raise ValueError(f"{len(values)} {name} but {len(seeds)} seeds")
    if init_image is None and (mask is not None or strength < 1.0):
        raise ValueError("img2img (strength < 1) and inpainting (mask) need an init image")
    conditioner, codec = model.conditioner, model.codec
    check_image_size(height, width, codec.downsample_factor)
    device = model.device
    x_T = seeded_noise(seeds, codec.latent_shape(height, width), device)
    x0 = latents_mask = None
    if conditioner.consumes_image:
        if strength < 1.0:
            raise ValueError(f"a {conditioner.kind} model takes the init image as its conditioning: strength must be 1")
        if init_image is not None and conditioner.output_size(*init_image.shape[-2:]) != (height, width):
            out_h, out_w = conditioner.output_size(*init_image.shape[-2:])
            raise ValueError(f"The init image is {init_image.shape[-1]}x{init_image.shape[-2]} (W x H): this {conditioner.kind} model "
                             f"makes {out_w}x{out_h} from it, not {width}x{height}.")
        if mask is not None:
            _check_spatial(mask, height, width, "mask")
        request_image, request_mask = init_image, mask
    else:
        request_image = request_mask = None
        if init_image is not None:
            _check_spatial(init_image, height, width, "init image")
            x0 = codec.encode(init_image, sample=False).expand_as(x_T)
        if mask is not None:
            _check_spatial(mask, height, width, "mask")
            latents_mask = latent_mask(mask.to(device), codec.downsample_factor)
    request = SamplingRequest(batch_size=len(seeds), prompts=prompts, negative_prompt=negative_prompt, class_labels=class_labels,
                              image=request_image, mask=request_mask)
    context, uncond = conditioner.sampling(request, codec)
    if not conditioner.guidable:
        guidance_scale = 1.0
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
