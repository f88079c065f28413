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


# --- a whole model as a diffusers folder ------------------------------------------------------------

_BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def text_encoder_to_transformers(text_encoder: nn.Module) -> nn.Module:
    """transformers' `CLIPTextModel` whose `last_hidden_state` is our encoder's output (the per-token
    embeddings the UNet attends to), as diffusers' pipelines use it. A last-layer encoder maps block for
    block; a penultimate-layer one (SD 2.x) becomes a model one block shorter, as diffusers' SD 2.x text
    encoders are, with `ln_final` as its final LayerNorm."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.checkpoints.sd_single_file import open_clip_to_hf_clip

    if not text_encoder.final_norm:
        raise ValueError("transformers' CLIPTextModel always applies its final LayerNorm; this text encoder does not (final_norm=false)")
    tower = text_encoder.text_tower
    blocks = tower.transformer.resblocks
    layers = len(blocks) - (1 if text_encoder.layer == "penultimate" else 0)
    width = tower.transformer.width
    quick = type(blocks[0].mlp.gelu).__name__ == "QuickGELU"
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings,
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=layers,
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act="quick_gelu" if quick else "gelu",
        layer_norm_eps=tower.ln_final.eps,
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=text_encoder.pad_token_id if text_encoder.pad_token_id is not None else 0,
    )
    state = {k: v for k, v in tower.state_dict().items() if not k.startswith(f"transformer.resblocks.{layers}.")}
    state = open_clip_to_hf_clip({k: v for k, v in state.items() if k != "attn_mask"})
    model = CLIPTextModel(config).eval()
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


def clip_tokenizer(text_encoder: nn.Module) -> Any:
    """transformers' `CLIPTokenizer` on the BPE vocabulary open_clip ships (the same as OpenAI's), padding
    as `text_encoder` pads: with the end-of-text token (SD 1.x) or with id 0, "!" (SD 2.x)."""
    from transformers import CLIPTokenizer

    bpe = text_encoder.tokenizer
    special = {bpe.sot_token_id: "<|startoftext|>", bpe.eot_token_id: "<|endoftext|>"}  # OpenAI's names (open_clip renames them)
    vocab = {special.get(i, token): i for token, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    pad_id = text_encoder.pad_token_id if text_encoder.pad_token_id is not None else 0
    pad = special.get(pad_id, bpe.decoder[pad_id])
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=text_encoder.max_length)


def scheduler_for(schedule_config: Mapping[str, Any], prediction: str) -> Any:
    """diffusers' `DDIMScheduler` over our noise schedule (checked: the same betas)."""
    from diffusers import DDIMScheduler

    from ldm.diffusion.schedule import NoiseSchedule

    kind = schedule_config.get("kind", "scaled_linear")
    if kind not in _BETA_SCHEDULES:
        raise ValueError(f"schedule kind {kind!r} has no diffusers beta_schedule")
    zero_snr = bool(schedule_config.get("zero_terminal_snr", False))
    scheduler = DDIMScheduler(
        num_train_timesteps=int(schedule_config.get("num_timesteps", 1000)),
        beta_start=float(schedule_config.get("beta_start", 0.00085)),
        beta_end=float(schedule_config.get("beta_end", 0.012)),
        beta_schedule=_BETA_SCHEDULES[kind],
        prediction_type=_PREDICTION_TYPES[prediction],
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=0 if zero_snr else 1,
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing" if zero_snr else "leading",
    )
    ours = NoiseSchedule(**{k: v for k, v in schedule_config.items() if not k.startswith("_")}).alphas_cumprod_f64
    if not torch.allclose(scheduler.alphas_cumprod.double(), ours, atol=1e-6):
        raise ValueError(f"diffusers' {_BETA_SCHEDULES[kind]} schedule differs from ours; not exported")
    return scheduler


def pipeline_to_diffusers(model: nn.Module) -> Any:
    """A diffusers `StableDiffusionPipeline` of a `LatentDiffusionModel` that `ldm.inference.load_model`
    loaded (its `metadata["configs"]` name the networks' configs). The UNet and autoencoder hold our
    tensors (no copy); the text encoder is a transformers model with copies."""
    from diffusers import StableDiffusionPipeline

    configs = model.metadata.get("configs")
    if not configs:
        raise ValueError("the model carries no configs (load it with ldm.inference.load_model)")
    unet = unet_to_diffusers(model.unet, configs["unet"])
    unet.register_to_config(sample_size=model.image_size // model.autoencoder.downsample_factor)
    vae = autoencoder_to_diffusers(model.autoencoder)
    vae.register_to_config(scaling_factor=float(model.scale_factor), sample_size=model.image_size)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder_to_transformers(model.text_encoder),
        tokenizer=clip_tokenizer(model.text_encoder),
        unet=unet,
        scheduler=scheduler_for(configs["schedule"], model.prediction),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
