"""Our UNet and autoencoder as diffusers models, through diffusers' own single-file converters.

The weights go through `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`, the code diffusers
uses to import an SD checkpoint, so a model exported here is what a diffusers user would get from our
checkpoint. The exported model holds the same tensors as ours (no copy): deep-copy ours first to train
the two apart. Needs the `dev` extra (`pip install -e .[dev]`).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import nn

from ldm.checkpoints.stable_diffusion import SD_PREFIXES
from ldm.modules.autoencoder import KLAutoencoder
from ldm.modules.unet import UNetModel


def _ldm_unet_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `unet_config.params` an SD yaml would carry for this model (SD 2.x yamls omit num_heads)."""
    params = {k: v for k, v in config.items() if k != "_target_"}
    if params["num_head_channels"] != -1:
        del params["num_heads"]
    return params


def unet_to_diffusers(model: UNetModel, config: Mapping[str, Any]) -> nn.Module:
    """A diffusers `UNet2DConditionModel` holding `model`'s weights (on `model`'s device and dtype).

    `config` is the UNet's model config (`configs/model/sd15.yaml` and the like, `_target_` allowed).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    checkpoint = {SD_PREFIXES["unet"] + k: v for k, v in model.state_dict().items()}
    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": _ldm_unet_params(config)},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=512)
    converted = convert_ldm_unet_checkpoint(checkpoint, diffusers_config)
    if len(converted) != len(checkpoint):
        raise RuntimeError(f"diffusers' converter gave {len(converted)} tensors for our {len(checkpoint)}")
    with torch.device("meta"):
        exported = UNet2DConditionModel(**diffusers_config)
    exported.load_state_dict(converted, strict=True, assign=True)
    return exported.eval()


def autoencoder_to_diffusers(model: KLAutoencoder) -> nn.Module:
    """A diffusers `AutoencoderKL` holding `model`'s weights (on `model`'s device and dtype)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    encoder = model.encoder
    if any(len(level.attn) for level in encoder.down) or encoder.mid.attn_1 is None:
        raise ValueError("diffusers' AutoencoderKL has attention in its middle block only: attn_resolutions=[], mid_attention=true")
    config = dict(
        in_channels=encoder.conv_in.in_channels,
        out_channels=model.decoder.conv_out.out_channels,
        down_block_types=["DownEncoderBlock2D"] * len(encoder.down),
        up_block_types=["UpDecoderBlock2D"] * len(encoder.down),
        block_out_channels=[level.block[0].conv2.out_channels for level in encoder.down],
        layers_per_block=len(encoder.down[0].block),
        latent_channels=model.latent_channels,
        norm_num_groups=encoder.norm_out.num_groups,
    )
    checkpoint = {SD_PREFIXES["autoencoder"] + k: v for k, v in model.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    with torch.device("meta"):
        exported = AutoencoderKL(**config)
    exported.load_state_dict(converted, strict=True, assign=True)
    return exported.eval()
