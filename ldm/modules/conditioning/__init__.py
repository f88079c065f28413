"""Conditioners: what a stage-2 UNet is conditioned on (text, a class, nothing, an image to inpaint or
upsample), each owning its drop rate and its unconditional value. The `conditioning` config group
(configs/conditioning/) picks one."""

from ldm.modules.conditioning.base import (
    INPUTS,
    Conditioner,
    Conditioning,
    SamplingRequest,
    build_conditioner,
    unet_forward,
)
from ldm.modules.conditioning.concat import InpaintingConditioner, SuperResolutionConditioner
from ldm.modules.conditioning.label import ClassConditioner, Unconditional
from ldm.modules.conditioning.masks import random_masks
from ldm.modules.conditioning.text import TextConditioner, build_text_encoder

__all__ = [
    "INPUTS",
    "ClassConditioner",
    "Conditioner",
    "Conditioning",
    "InpaintingConditioner",
    "SamplingRequest",
    "SuperResolutionConditioner",
    "TextConditioner",
    "Unconditional",
    "build_conditioner",
    "build_text_encoder",
    "random_masks",
    "unet_forward",
]
