"""Stable Diffusion 1.x / 2.x single files in and out: all three networks, their configs inferred from the
keys and shapes, the UNet's prediction and schedule from the file's kind.

A single file (`v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned.ckpt`, ...) holds

* `model.diffusion_model.*`: the UNet, in our UNet's own layout (`ldm.modules.unet`);
* `model_ema.*` (some files): the EMA copy of the UNet, under CompVis' LitEma names (the parameter
  name without dots: `model_ema.diffusion_modelinput_blocks00weight`);
* `first_stage_model.*`: the kl-f8 autoencoder, in our `KLAutoencoder`'s layout;
* `cond_stage_model.*`: the text encoder. SD 1.x: OpenAI's CLIP ViT-L/14 text model in the transformers
  layout (`cond_stage_model.transformer.text_model.*`), QuickGELU, last layer, padded with the
  end-of-text token. SD 2.x: OpenCLIP's ViT-H/14 (`cond_stage_model.model.*`, open_clip's own names),
  GELU, penultimate layer. Both become our `OpenCLIPTextEncoder` (open_clip's text tower): the
  transformers names are mapped onto open_clip's (q/k/v projections concatenated into `in_proj`).

What the weights cannot say follows SD's conventions: 64-channel heads in the text transformers, 8
heads per UNet transformer in SD 1.x and 64-channel heads in SD 2.x, 32 normalisation groups, SD's
scaled_linear schedule and latent scale 0.18215; SD 1.x predicts eps at 512 px, SD 2.x v at 768 px
(a 2.x-base file predicts eps at 512: pass `prediction="eps"`). A file written by our export carries
its exact configs in the safetensors header (`ldm_config`), and those are used instead.

Files are read once, safely: `.ckpt` through `read_checkpoint` (`weights_only=True`; nothing in the file
runs), `.safetensors` tensor by tensor, only the tensors that are used (a `v1-5-pruned` file holds the
UNet twice).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from torch import Tensor, nn

from ldm.checkpoints.io import SAFETENSORS, CheckpointNotFoundError, read_checkpoint
from ldm.errors import CheckpointError

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
AUTOENCODER_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
HF_CLIP_PREFIX = "cond_stage_model.transformer."       # SD 1.x: transformers' CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."           # SD 2.x: open_clip's CLIP without its visual tower
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
METADATA_KEY = "ldm_config"                            # our export's configs, in the safetensors header

SD_SCALE_FACTOR = 0.18215
SD1_PAD_TOKEN = 49407                                  # SD 1.x pads with the end-of-text token
TEXT_HEAD_CHANNELS = 64                                # CLIP ViT-L/14 and OpenCLIP ViT-H/14 text heads
SD_SCHEDULE = {
    "_target_": "ldm.diffusion.schedule.NoiseSchedule",
    "kind": "scaled_linear",
    "num_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "zero_terminal_snr": False,
}
SD2_BASE_GLOBAL_STEP = 875000  # 512-base-ema.ckpt's; diffusers' importer uses the same (brittle) sign
PREDICTIONS = ("eps", "v")
TEXT_ENCODER_TARGET = "ldm.modules.text_encoder.OpenCLIPTextEncoder"

# transformers' CLIP encoder layer <-> open_clip's residual block (q/k/v are handled apart).
_HF_TO_OPEN_CLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


@dataclass
class StableDiffusionFile:
    """The networks of an SD single file as our configs (`_target_` included) and state dicts."""

    path: str
    version: str                      # "sd1" (CLIP ViT-L text, transformers layout) | "sd2" (OpenCLIP)
    unet_config: dict[str, Any]
    autoencoder_config: dict[str, Any]
    text_encoder_config: dict[str, Any]
    schedule_config: dict[str, Any]
    unet: dict[str, Tensor]
    autoencoder: dict[str, Tensor]
    text_encoder: dict[str, Tensor]   # open_clip text-tower names
    prediction: str
    image_size: int
    scale_factor: float
    weights: str                      # "ema" (the file's model_ema.*) | "model" (its model.diffusion_model.*)
    global_step: int | None = None
    has_ema: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def configs(self) -> dict[str, Any]:
        return {"unet": self.unet_config, "autoencoder": self.autoencoder_config,
                "text_encoder": self.text_encoder_config, "schedule": self.schedule_config}


# --- recognising and reading ---------------------------------------------------------------------

def is_sd_state(keys: Iterable[str]) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in keys)


def is_sd_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """A dict read from a file is an SD single file: UNet weights under `model.diffusion_model.` and not
    written by our train.py (which keeps its UNet under `unet.` and records its stage)."""
    if ckpt.get("ldm_stage") or (ckpt.get("hyper_parameters") or {}).get("stage"):
        return False
    state = ckpt.get("state_dict", ckpt)
    return isinstance(state, Mapping) and is_sd_state(state)


def safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """The tensor names and the metadata of a `.safetensors` file, without reading any tensor."""
    from safetensors import SafetensorError, safe_open

    _check_file(Path(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {_first_line(err)}") from None


def read_sd_file(
    path: str | os.PathLike,
    use_ema: bool = True,
    prediction: str | None = None,
    image_size: int | None = None,
) -> StableDiffusionFile:
    """An SD 1.x / 2.x single file (`.safetensors` or a torch `.ckpt`), read once and safely.

    `use_ema`: the UNet from the file's `model_ema.*` when it has them (else its `model.diffusion_model.*`,
    which in `-emaonly` files already are the EMA weights). `prediction` ("eps" | "v") and `image_size`
    override what the file's kind implies."""
    path = Path(path)
    if path.suffix == SAFETENSORS:
        keys, header = safetensors_header(path)
        if not is_sd_state(keys):
            raise CheckpointError(_not_sd_message(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return sd_file_from_tensors(keys, f.get_tensor, path, use_ema, prediction, image_size, header=header)
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    if not is_sd_checkpoint(ckpt):
        raise CheckpointError(_not_sd_message(path))
    step = ckpt.get("global_step")
    return sd_file_from_tensors(list(state), state.__getitem__, path, use_ema, prediction, image_size,
                                global_step=int(step) if isinstance(step, int) else None)


def sd_file_from_tensors(
    keys: list[str],
    get: Callable[[str], Tensor],
    path: str | os.PathLike,
    use_ema: bool = True,
    prediction: str | None = None,
    image_size: int | None = None,
    global_step: int | None = None,
    header: Mapping[str, str] | None = None,
) -> StableDiffusionFile:
    """The networks of an SD file whose tensors are `get(key)` for `key` in `keys` (each read once)."""
    if prediction is not None and prediction not in PREDICTIONS:
        raise CheckpointError(f"prediction={prediction!r}: an SD UNet predicts one of {PREDICTIONS}.")
    keys = [k for k in keys if isinstance(k, str)]
    ours = _our_configs(header, path)

    text_layout = "hf_clip" if any(k.startswith(HF_CLIP_PREFIX) for k in keys) else (
        "open_clip" if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys) else None)
    if text_layout is None:
        raise CheckpointError(
            f"{path} has no text encoder (neither `{HF_CLIP_PREFIX}*`, SD 1.x's CLIP, nor `{OPEN_CLIP_PREFIX}*`, "
            "SD 2.x's OpenCLIP): only SD 1.x / 2.x single files with all three networks are read.")
    if not any(k.startswith(AUTOENCODER_PREFIX) for k in keys):
        raise CheckpointError(f"{path} has no autoencoder (`{AUTOENCODER_PREFIX}*`): only SD single files with all three networks are read.")
    version = "sd1" if text_layout == "hf_clip" else "sd2"

    unet_keys = [k for k in keys if k.startswith(UNET_PREFIX)]
    ema_names = {k for k in keys if k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING}
    has_ema = bool(ema_names)
    weights = "ema" if use_ema and has_ema else "model"
    if weights == "ema":
        unet = {}
        for key in unet_keys:
            ema_key = EMA_PREFIX + key[len("model."):].replace(".", "")
            if ema_key not in ema_names:
                raise CheckpointError(f"{path}: its EMA weights (model_ema.*) lack {ema_key}; pass use_ema=false for its model weights.")
            unet[key[len(UNET_PREFIX):]] = _fp32(get(ema_key))
    else:
        unet = {k[len(UNET_PREFIX):]: _fp32(get(k)) for k in unet_keys}
    autoencoder = _autoencoder_state({k[len(AUTOENCODER_PREFIX):]: _fp32(get(k)) for k in keys if k.startswith(AUTOENCODER_PREFIX)})
    if text_layout == "hf_clip":
        text_encoder, text_config = _hf_clip_text({k[len(HF_CLIP_PREFIX):]: get(k) for k in keys if k.startswith(HF_CLIP_PREFIX)}, path)
    else:
        text_encoder, text_config = _open_clip_text({k[len(OPEN_CLIP_PREFIX):]: get(k) for k in keys if k.startswith(OPEN_CLIP_PREFIX)}, path)

    if ours:
        unet_config, autoencoder_config = dict(ours["unet"]), dict(ours["autoencoder"])
        text_config, schedule_config = dict(ours["text_encoder"]), dict(ours["schedule"])
        kind_prediction, kind_size = ours["prediction"], int(ours["image_size"])
        scale_factor = float(ours["scale_factor"])
    else:
        unet_config = infer_unet_config(unet, version, path)
        kind_prediction = "eps" if version == "sd1" or global_step == SD2_BASE_GLOBAL_STEP else "v"
        kind_size = 768 if kind_prediction == "v" else 512
        autoencoder_config = infer_autoencoder_config(autoencoder, path, resolution=image_size or kind_size)
        schedule_config, scale_factor = dict(SD_SCHEDULE), SD_SCALE_FACTOR
    if unet_config.get("context_dim") != _text_width(text_config):
        raise CheckpointError(f"{path}: its UNet attends to {unet_config.get('context_dim')}-d context but its text encoder gives "
                              f"{_text_width(text_config)}-d embeddings.")
    return StableDiffusionFile(
        path=str(path), version=version, unet_config=unet_config, autoencoder_config=autoencoder_config,
        text_encoder_config=text_config, schedule_config=schedule_config, unet=unet, autoencoder=autoencoder,
        text_encoder=text_encoder, prediction=prediction or kind_prediction, image_size=int(image_size or kind_size),
        scale_factor=scale_factor, weights=weights, global_step=global_step, has_ema=has_ema,
        metadata={"exported_by_ldm": bool(ours)},
    )


def _our_configs(header: Mapping[str, str] | None, path: str | os.PathLike) -> dict[str, Any] | None:
    if not header or METADATA_KEY not in header:
        return None
    try:
        configs = json.loads(header[METADATA_KEY])
        for key in ("unet", "autoencoder", "text_encoder", "schedule", "prediction", "image_size", "scale_factor"):
            configs[key]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: its `{METADATA_KEY}` header is not ldm's export config ({_first_line(err)}).") from None
    return configs


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointNotFoundError(f"Checkpoint {path} does not exist.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes): a write that never finished?")


def _not_sd_message(path: Path) -> str:
    return (f"{path} is not a Stable Diffusion single file (no `{UNET_PREFIX}*` weights) nor a checkpoint of "
            "`python train.py stage=ldm`.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _fp32(tensor: Tensor) -> Tensor:
    """Floating tensors as float32 (many SD files are fp16): our networks are built in fp32."""
    return tensor.float() if tensor.is_floating_point() else tensor


# --- configs from shapes --------------------------------------------------------------------------

def _indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := regex.match(k))})


def infer_unet_config(state: Mapping[str, Tensor], version: str, path: str | os.PathLike = "") -> dict[str, Any]:
    """Our UNet config (as configs/model/sd15.yaml, sd21.yaml) for SD UNet weights (prefix stripped).

    Widths, levels, blocks, attention levels, context width, depth and projection kind come from the
    shapes; the head split, which shapes do not show, from the version: SD 1.x 8 heads, SD 2.x 64-channel heads."""
    try:
        conv_in = state["input_blocks.0.0.weight"]
        model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
        out_channels = state["out.2.weight"].shape[0]
        blocks = _indices(state, r"input_blocks\.(\d+)\.")
        channel_mult, attention_levels, per_level, num_res_blocks, factor = [], [], 0, None, 1
        for i in blocks[1:]:
            if f"input_blocks.{i}.0.op.weight" in state:  # a downsample closes a level
                num_res_blocks = num_res_blocks or per_level
                per_level, factor = 0, factor * 2
                continue
            per_level += 1
            if per_level == 1:
                channel_mult.append(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // model_channels)
                if f"input_blocks.{i}.1.proj_in.weight" in state:
                    attention_levels.append(factor)
        num_res_blocks = num_res_blocks or per_level
        proj_in = state["middle_block.1.proj_in.weight"]
        context_dim = state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        depth = len(_indices(state, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    except KeyError as err:
        raise CheckpointError(f"{path}: its UNet (model.diffusion_model.*) lacks {err.args[0]}: not an SD 1.x / 2.x UNet.") from None
    if in_channels != out_channels:
        raise CheckpointError(f"{path}: its UNet takes {in_channels} channels and predicts {out_channels} (an inpainting or "
                              "depth model?): only text-to-image SD UNets are read.")
    heads = {"num_heads": 8, "num_head_channels": -1} if version == "sd1" else {"num_heads": -1, "num_head_channels": 64}
    return {
        "_target_": "ldm.modules.unet.UNetModel",
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "model_channels": int(model_channels),
        "attention_resolutions": attention_levels,
        "num_res_blocks": int(num_res_blocks),
        "channel_mult": [int(m) for m in channel_mult],
        **heads,
        "context_dim": int(context_dim),
        "transformer_depth": depth,
        "use_linear_in_transformer": proj_in.ndim == 2,
        "dropout": 0.0,
        "gradient_checkpointing": False,
        "norm_groups": 32,
    }


def _autoencoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Attention projections stored as linear weights (files converted from diffusers) as our 1x1 convolutions."""
    for key, value in state.items():
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            state[key] = value[:, :, None, None]
    return state


def infer_autoencoder_config(state: Mapping[str, Tensor], path: str | os.PathLike = "", resolution: int = 512) -> dict[str, Any]:
    """Our KLAutoencoder config (as configs/model/kl_f8.yaml) for SD autoencoder weights (prefix stripped).
    `resolution` is the images' size (it places attention only where attn_resolutions name one)."""
    try:
        conv_in = state["encoder.conv_in.weight"]
        ch, in_channels = conv_in.shape[0], conv_in.shape[1]
        levels = _indices(state, r"encoder\.down\.(\d+)\.")
        ch_mult = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels]
        num_res_blocks = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
        attn = [resolution // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state]
        z_channels = state["decoder.conv_in.weight"].shape[1]
        embed_dim = state["post_quant_conv.weight"].shape[1]
        out_channels = state["decoder.conv_out.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"{path}: its autoencoder (first_stage_model.*) lacks {err.args[0]}: not a KL autoencoder.") from None
    return {
        "_target_": "ldm.modules.autoencoder.KLAutoencoder",
        "embed_dim": int(embed_dim),
        "z_channels": int(z_channels),
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "ch": int(ch),
        "ch_mult": [int(m) for m in ch_mult],
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": attn,
        "dropout": 0.0,
        "resolution": int(resolution),
        "double_z": True,
        "mid_attention": "encoder.mid.attn_1.q.weight" in state,
        "norm_groups": 32,
    }


def _text_width(config: Mapping[str, Any]) -> int | None:
    model_cfg = config.get("model_cfg") or {}
    return (model_cfg.get("text_cfg") or {}).get("width")


def _text_config(arch: str, width: int, vocab: int, context: int, layers: int, mlp_ratio: float, embed_dim: int | None,
                 quick_gelu: bool, layer: str, pad_token_id: int | None) -> dict[str, Any]:
    text_cfg = {"context_length": context, "vocab_size": vocab, "width": width, "heads": max(1, width // TEXT_HEAD_CHANNELS),
                "layers": layers, "mlp_ratio": mlp_ratio}
    if embed_dim is None:
        text_cfg["proj_type"] = "none"
    config = {
        "_target_": TEXT_ENCODER_TARGET,
        "arch": arch,
        "pretrained": None,
        "weights_path": None,
        "layer": layer,
        "final_norm": True,
        "max_length": context,
        "model_cfg": {"embed_dim": embed_dim or width, "quick_gelu": quick_gelu, "text_cfg": text_cfg},
        "seed": 0,
    }
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    return config


def _count_layers(state: Mapping[str, Tensor], pattern: str) -> int:
    return len(_indices(state, pattern))


def hf_clip_to_open_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers' `CLIPTextModel` weights (`text_model.` prefix optional) in open_clip's text-tower names."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    for i in range(_count_layers(state, r"encoder\.layers\.(\d+)\.")):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for hf, oc in _HF_TO_OPEN_CLIP_LAYER.items():
                out[f"{dst}{oc}{kind}"] = state[f"{src}{hf}{kind}"]
    return out


def open_clip_to_hf_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The reverse of `hf_clip_to_open_clip`, under `text_model.` (the text projection has no place there)."""
    width = state["token_embedding.weight"].shape[1]
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
    }
    for i in range(_count_layers(state, r"transformer\.resblocks\.(\d+)\.")):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for j, p in enumerate("qkv"):
                out[f"{dst}self_attn.{p}_proj.{kind}"] = state[f"{src}attn.in_proj_{kind}"][j * width:(j + 1) * width]
            for hf, oc in _HF_TO_OPEN_CLIP_LAYER.items():
                out[f"{dst}{hf}{kind}"] = state[f"{src}{oc}{kind}"]
    return out


def _hf_clip_text(state: Mapping[str, Tensor], path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = {k: _fp32(v) for k, v in state.items() if not k.endswith("position_ids")}
    try:
        weights = hf_clip_to_open_clip(state)
    except KeyError as err:
        raise CheckpointError(f"{path}: its CLIP text model ({HF_CLIP_PREFIX}*) lacks {err.args[0]}.") from None
    vocab, width = weights["token_embedding.weight"].shape
    layers = _count_layers(weights, r"transformer\.resblocks\.(\d+)\.")
    mlp_ratio = weights["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    config = _text_config("sd1-clip-text", width, vocab, weights["positional_embedding"].shape[0], layers, mlp_ratio,
                          None, quick_gelu=True, layer="last", pad_token_id=SD1_PAD_TOKEN)
    return weights, config


def _open_clip_text(state: Mapping[str, Tensor], path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    weights = {k: _fp32(v) for k, v in state.items() if k not in ("logit_scale", "logit_bias", "attn_mask") and not k.startswith("visual.")}
    try:
        vocab, width = weights["token_embedding.weight"].shape
        context = weights["positional_embedding"].shape[0]
        mlp_ratio = weights["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    except KeyError as err:
        raise CheckpointError(f"{path}: its OpenCLIP text model ({OPEN_CLIP_PREFIX}*) lacks {err.args[0]}.") from None
    projection = weights.get("text_projection")
    layers = _count_layers(weights, r"transformer\.resblocks\.(\d+)\.")
    config = _text_config("sd2-openclip-text", width, vocab, context, layers, mlp_ratio,
                          None if projection is None else projection.shape[1], quick_gelu=False, layer="penultimate", pad_token_id=None)
    return weights, config


# --- building our networks ------------------------------------------------------------------------

def module_from_state(config: Mapping[str, Any], state: Mapping[str, Tensor], what: str, path: str | os.PathLike = "") -> nn.Module:
    """`config`'s module holding `state` (strictly), built without a random initialisation first (an
    SD-size UNet takes minutes to initialise on a CPU)."""
    with torch.device("meta"):
        module = hydra.utils.instantiate(dict(config))
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its {what} weights do not fit the {what} config inferred from them "
                              f"({_first_line(err)})") from None
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):  # a buffer no state dict holds
        module = hydra.utils.instantiate(dict(config))
        module.load_state_dict(state, strict=True)
    return module


def build_text_encoder_from_state(config: Mapping[str, Any], weights: Mapping[str, Tensor], path: str | os.PathLike = "") -> nn.Module:
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        return hydra.utils.get_class(config["_target_"])(**kwargs, state_dict=weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its text encoder weights do not fit the config inferred from them ({_first_line(err)})") from None


def build_networks(sd: StableDiffusionFile) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(UNet, autoencoder, text encoder) of a read SD file, holding its weights."""
    unet = module_from_state(sd.unet_config, sd.unet, "UNet", sd.path)
    autoencoder = module_from_state(sd.autoencoder_config, sd.autoencoder, "autoencoder", sd.path)
    text_encoder = build_text_encoder_from_state(sd.text_encoder_config, sd.text_encoder, sd.path)
    return unet, autoencoder, text_encoder


# --- writing --------------------------------------------------------------------------------------

def text_layout_of(text_encoder: nn.Module) -> str:
    """Where an encoder goes in an SD file: "hf_clip" (SD 1.x's place: a last-layer encoder) or
    "open_clip" (SD 2.x's: penultimate)."""
    return "hf_clip" if getattr(text_encoder, "layer", "penultimate") == "last" else "open_clip"


def sd_conventions_problems(text_encoder: nn.Module) -> list[str]:
    """How a text encoder differs from what other tools assume of its place in an SD file (our own loader
    reads the exact config from the file's header, so these matter only to other tools)."""
    config = getattr(text_encoder, "config", {})
    tower = text_encoder.text_tower
    block = tower.transformer.resblocks[0]
    quick = type(block.mlp.gelu).__name__ == "QuickGELU"
    width, heads = tower.transformer.width, block.attn.num_heads
    problems = []
    if width // heads != TEXT_HEAD_CHANNELS:
        problems.append(f"{heads} heads of {width // heads} channels (CLIP's are 64 wide)")
    if not config.get("final_norm", True):
        problems.append("no final LayerNorm")
    if text_layout_of(text_encoder) == "hf_clip":
        if not quick:
            problems.append("GELU (SD 1.x's CLIP uses QuickGELU)")
        if config.get("pad_token_id") != SD1_PAD_TOKEN:
            problems.append("padding with 0 (SD 1.x pads with 49407)")
    else:
        if quick:
            problems.append("QuickGELU (SD 2.x's OpenCLIP uses GELU)")
        if config.get("pad_token_id") not in (None, 0):
            problems.append(f"padding with {config.get('pad_token_id')} (SD 2.x pads with 0)")
    return problems


def exported_text_config(config: Mapping[str, Any], text_encoder: nn.Module) -> dict[str, Any]:
    """The text-encoder config that rebuilds what `sd_state_dict` writes (the weights come from the file,
    not from a tag or a path). In SD 1.x's place (transformers' CLIPTextModel) there is no text
    projection; the per-token embeddings never use it, so the config drops it."""
    config = json.loads(json.dumps(dict(config), default=str))
    config["weights_path"] = None
    tower = text_encoder.text_tower
    if text_layout_of(text_encoder) == "hf_clip" and getattr(tower, "text_projection", None) is not None:
        import open_clip

        model_cfg = config.get("model_cfg") or json.loads(json.dumps(open_clip.get_model_config(config["arch"])))
        model_cfg["embed_dim"] = tower.transformer.width
        model_cfg["text_cfg"]["proj_type"] = "none"
        model_cfg["quick_gelu"] = type(tower.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
        config.update(model_cfg=model_cfg, pretrained=None)
    return config


def sd_state_dict(unet: nn.Module, autoencoder: nn.Module, text_encoder: nn.Module) -> dict[str, Tensor]:
    """The three networks under SD's single-file key names (text encoder: `text_layout_of`)."""
    out = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    out.update({AUTOENCODER_PREFIX + k: v for k, v in autoencoder.state_dict().items()})
    text = {k: v for k, v in text_encoder.text_tower.state_dict().items() if k != "attn_mask"}
    if text_layout_of(text_encoder) == "hf_clip":
        text = open_clip_to_hf_clip(text)
        out.update({HF_CLIP_PREFIX + k: v for k, v in text.items()})
    else:
        out.update({OPEN_CLIP_PREFIX + k: v for k, v in text.items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


def export_metadata(configs: Mapping[str, Any], prediction: str, image_size: int, scale_factor: float) -> dict[str, str]:
    """The safetensors header our loader reads back (other tools ignore it)."""
    payload = {**{k: configs[k] for k in ("unet", "autoencoder", "text_encoder", "schedule")},
               "prediction": prediction, "image_size": int(image_size), "scale_factor": float(scale_factor)}
    return {"format": "pt", METADATA_KEY: json.dumps(payload, sort_keys=True)}


def save_sd_file(
    path: str | os.PathLike,
    unet: nn.Module,
    autoencoder: nn.Module,
    text_encoder: nn.Module,
    configs: Mapping[str, Any],
    prediction: str,
    image_size: int,
    scale_factor: float,
    dtype: torch.dtype | None = None,
) -> Path:
    """One original-layout `.safetensors` (UNet + autoencoder + text encoder under SD's key names) that
    SD tools read, with our configs in its header for our own loader. Written to a temporary file and
    renamed into place. `dtype` (e.g. torch.float16) converts the floating tensors."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SAFETENSORS:
        raise CheckpointError(f"out={path}: an SD single file is written as .safetensors (name it {path.with_suffix(SAFETENSORS).name}).")
    for problem in sd_conventions_problems(text_encoder):
        log.warning("The text encoder has %s: ldm reads this file back exactly, but SD tools assume their own conventions.", problem)
    configs = {**configs, "text_encoder": exported_text_config(configs["text_encoder"], text_encoder)}
    state = sd_state_dict(unet, autoencoder, text_encoder)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.cpu().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(temp), metadata=export_metadata(configs, prediction, image_size, scale_factor))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
