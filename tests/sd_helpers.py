"""Reference Stable Diffusion single files for the tests, made without ldm's loader.

The networks are the ecosystem's own at random init: diffusers' `UNet2DConditionModel` and
`AutoencoderKL` with the SD 1.5 / SD 2.1 configurations, transformers' `CLIPTextModel` with the
CLIP ViT-L/14 text configuration (SD 1.x) and open_clip's ViT-H/14 text tower (SD 2.x), at narrow widths
with the real layouts (depths, levels, head widths). They are written in the original single-file layout
by the mapping below, which follows diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`
(diffusers' names -> CompVis' names) and shares no code with `ldm.checkpoints`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SD1_PAD = 49407
TEXT_WIDTH = 128            # 2 heads of 64 channels, as CLIP's
SD1_TEXT_LAYERS = 12        # CLIP ViT-L/14's depth
SD2_TEXT_LAYERS = 24        # OpenCLIP ViT-H/14's depth (diffusers ignores its block 23 for the penultimate layer)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random, including zero-initialised output layers that would hide whole branches."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * param[0].numel() ** -0.5)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


# --- the reference networks ----------------------------------------------------------------------

def diffusers_unet(version: str, seed: int = 0, context_dim: int = TEXT_WIDTH) -> nn.Module:
    """SD 1.5's / SD 2.1's UNet2DConditionModel config at 1/10 (SD 1.x) or 1/5 (SD 2.x, 64-channel heads) width."""
    from diffusers import UNet2DConditionModel

    common = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": context_dim,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if version == "sd1":  # SD 1.5: attention_head_dim=8 is the number of heads
        config = {"block_out_channels": (32, 64, 128, 128), "attention_head_dim": 8, "use_linear_projection": False}
    else:  # SD 2.1: 64-channel heads ([5, 10, 20, 20] heads at 320 channels), linear projections
        config = {"block_out_channels": (64, 128, 256, 256), "attention_head_dim": (1, 2, 4, 4), "use_linear_projection": True}
    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**common, **config), seed).eval()


def diffusers_vae(seed: int = 0) -> nn.Module:
    """SD's AutoencoderKL (kl-f8) config at 1/4 width."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 64, 128, 128],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    return randomize_(vae, seed).eval()


def hf_clip_text_model(seed: int = 0) -> nn.Module:
    """transformers' CLIPTextModel with CLIP ViT-L/14's text config (QuickGELU, 12 layers, 64-channel heads), narrow."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                            num_hidden_layers=SD1_TEXT_LAYERS, num_attention_heads=TEXT_WIDTH // 64,
                            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=TEXT_WIDTH,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    torch.manual_seed(seed)
    return randomize_(CLIPTextModel(config), seed).eval()


def open_clip_model(seed: int = 0, layers: int = SD2_TEXT_LAYERS) -> nn.Module:
    """open_clip's CLIP with ViT-H/14's text config (GELU, 24 blocks, 64-channel heads), narrow, as SD 2.x's
    FrozenOpenCLIPEmbedder holds it: the visual tower deleted."""
    import open_clip

    text_cfg = dict(open_clip.get_model_config("ViT-H-14")["text_cfg"], width=TEXT_WIDTH, heads=TEXT_WIDTH // 64, layers=layers)
    vision_cfg = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32}
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=96, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=False)
    del model.visual
    return randomize_(model, seed).eval()


# --- reference text embeddings ------------------------------------------------------------------

def sd1_token_ids(captions: list[str]) -> Tensor:
    """SD 1.x's input ids: CLIP BPE, start token, caption, end token, then the end token again (49407) to 77."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    rows = []
    for caption in captions:
        ids = [tokenizer.sot_token_id, *tokenizer.encode(caption)[:75], tokenizer.eot_token_id]
        rows.append(ids + [SD1_PAD] * (77 - len(ids)))
    return torch.tensor(rows)


def sd2_token_ids(captions: list[str]) -> Tensor:
    """SD 2.x's: open_clip.tokenize (zero padding)."""
    import open_clip

    return open_clip.tokenize(captions)


@torch.no_grad()
def sd1_reference_context(model: nn.Module, ids: Tensor) -> Tensor:
    """SD 1.x's FrozenCLIPEmbedder: the last hidden state (after the final LayerNorm), no attention mask."""
    return model(input_ids=ids).last_hidden_state


@torch.no_grad()
def sd2_reference_context(model: nn.Module, ids: Tensor) -> Tensor:
    """SD 2.x's FrozenOpenCLIPEmbedder(layer="penultimate"): every block but the last, then ln_final."""
    x = model.token_embedding(ids) + model.positional_embedding
    blocks = model.transformer.resblocks
    batch_first = getattr(model.transformer, "batch_first", True)
    if not batch_first:
        x = x.permute(1, 0, 2)
    for block in blocks[: len(blocks) - 1]:
        x = block(x, attn_mask=model.attn_mask)
    if not batch_first:
        x = x.permute(1, 0, 2)
    return model.ln_final(x)


# --- diffusers' names -> the original single-file layout ----------------------------------------

def _unet_map(num_levels: int = 4, layers: int = 2) -> list[tuple[str, str]]:
    """(SD prefix, diffusers prefix) pairs, as diffusers' convert_diffusers_to_original_stable_diffusion.py."""
    pairs = []
    for i in range(num_levels):
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < num_levels - 1:
                pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < num_levels - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
                ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def unet_to_sd(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    pairs = _unet_map()
    for key, value in state.items():
        new = key
        for hf, sd in _UNET_TOP.items():
            if new.startswith(hf):
                new = sd + new[len(hf):]
        if "resnets" in new:
            for sd_part, hf_part in _UNET_RESNET:
                new = new.replace(hf_part, sd_part)
        for sd_prefix, hf_prefix in pairs:
            new = new.replace(hf_prefix, sd_prefix)
        out[new] = value
    return out


def vae_to_sd(state: dict[str, Tensor], num_levels: int = 4) -> dict[str, Tensor]:
    renames = [
        (r"down_blocks\.(\d+)\.resnets\.", lambda m: f"down.{m[1]}.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m[1]}.downsample."),
        (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{num_levels - 1 - int(m[1])}.block."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{num_levels - 1 - int(m[1])}.upsample."),
        (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.", lambda m: "mid.attn_1."),
        (r"conv_shortcut", lambda m: "nin_shortcut"),
        (r"conv_norm_out", lambda m: "norm_out"),
        (r"group_norm", lambda m: "norm"),
        (r"to_([qkv])\.", lambda m: f"{m[1]}."),
        (r"to_out\.0\.", lambda m: "proj_out."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original layout's 1x1 convolutions
        out[key] = value
    return out


def sd_single_file_state(version: str, unet: nn.Module, vae: nn.Module, text: nn.Module, ema_unet: nn.Module | None = None) -> dict[str, Tensor]:
    """The original layout: model.diffusion_model.*, first_stage_model.*, cond_stage_model.* (+ model_ema.*)."""
    state = {f"model.diffusion_model.{k}": v for k, v in unet_to_sd(unet.state_dict()).items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_sd(vae.state_dict()).items()})
    if version == "sd1":  # FrozenCLIPEmbedder.transformer is a CLIPTextModel (text_model.* in transformers < 5.6)
        text_state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.state_dict().items()}
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text_state.items()})
    else:  # FrozenOpenCLIPEmbedder.model is open_clip's CLIP without .visual
        state.update({f"cond_stage_model.model.{k}": v for k, v in text.state_dict().items()})
    if ema_unet is not None:  # CompVis' LitEma: the parameter's name under the wrapper, without dots
        for key, value in unet_to_sd(ema_unet.state_dict()).items():
            state["model_ema." + f"diffusion_model.{key}".replace(".", "")] = value
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_sd_file(path: Path, state: dict[str, Tensor], global_step: int | None = None) -> Path:
    """`.safetensors` (tensors only) or a torch `.ckpt` as CompVis' trainer saves it ({"state_dict", "global_step"})."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        ckpt: dict[str, Any] = {"state_dict": state}
        if global_step is not None:
            ckpt["global_step"] = global_step
        torch.save(ckpt, path)
    return path


class References:
    """The reference networks of one SD version and the file they were written to."""

    def __init__(self, version: str, path: Path, with_ema: bool = False, global_step: int | None = None) -> None:
        self.version = version
        self.unet = diffusers_unet(version, seed=1)
        self.vae = diffusers_vae(seed=2)
        self.text = hf_clip_text_model(seed=3) if version == "sd1" else open_clip_model(seed=3)
        self.ema_unet = diffusers_unet(version, seed=4) if with_ema else None
        self.path = write_sd_file(path, sd_single_file_state(version, self.unet, self.vae, self.text, self.ema_unet), global_step)

    def token_ids(self, captions: list[str]) -> Tensor:
        return sd1_token_ids(captions) if self.version == "sd1" else sd2_token_ids(captions)

    def context(self, ids: Tensor) -> Tensor:
        return sd1_reference_context(self.text, ids) if self.version == "sd1" else sd2_reference_context(self.text, ids)
