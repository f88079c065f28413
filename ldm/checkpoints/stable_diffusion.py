"""Stable Diffusion single files (`v1-5-pruned.safetensors`, ...): which keys hold which network."""

from __future__ import annotations

import os

import torch

from ldm.checkpoints.io import read_checkpoint, sub_state_dict
from ldm.errors import CheckpointError

SD_PREFIXES = {"autoencoder": "first_stage_model.", "unet": "model.diffusion_model.", "text_encoder": "cond_stage_model."}


def load_sd_state_dict(path: str | os.PathLike, component: str) -> dict[str, torch.Tensor]:
    """One component ("autoencoder", "unet", "text_encoder") of a Stable Diffusion `.ckpt`/`.safetensors`,
    with its SD prefix stripped, ready for a strict `load_state_dict` into our matching module."""
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    prefix = SD_PREFIXES[component]
    sub = sub_state_dict(state, prefix)
    if not sub:
        raise CheckpointError(f"{path} has no `{prefix}*` weights: it is not a Stable Diffusion checkpoint with a {component}.")
    return sub
