"""Generating images from a trained model, without Lightning: load it (`load_model`), then
text-to-image, img2img or inpainting (`generate_images`); `ldm.inference.sample` is what
`python sample.py` does. Imports torch, the networks and the samplers, never `ldm.training`."""

from ldm.inference.model import LatentDiffusionModel, build_text_encoder, load_model
from ldm.inference.pipeline import (
    STEP_NOISE_SEED_OFFSET,
    check_image_size,
    denoise_latents,
    generate_images,
    guided_network,
    latent_mask,
    seeded_noise,
)

__all__ = [
    "STEP_NOISE_SEED_OFFSET",
    "LatentDiffusionModel",
    "build_text_encoder",
    "check_image_size",
    "denoise_latents",
    "generate_images",
    "guided_network",
    "latent_mask",
    "load_model",
    "seeded_noise",
]
