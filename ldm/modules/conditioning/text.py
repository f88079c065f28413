"""Text through a frozen OpenCLIP tower, as cross-attention context: what stage 2 always did."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import hydra
import torch
from torch import Tensor, nn

from ldm.errors import ConfigError
from ldm.modules.conditioning.base import Conditioner, Conditioning, SamplingRequest, select
from ldm.modules.latent_codec import LatentCodec

TEXT_ENCODER_PREFIX = "text_encoder."


def build_text_encoder(cfg: Mapping[str, Any], weights: Mapping[str, Tensor] | None = None) -> nn.Module:
    """The configured text encoder; with `weights`, built directly on them.

    The config is kept as trained (its `pretrained` tag, for one, decides QuickGELU vs GELU for
    OpenAI CLIP towers), and nothing is downloaded or randomly initialised first.
    """
    if weights is None:
        return hydra.utils.instantiate(dict(cfg))
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return hydra.utils.get_class(cfg["_target_"])(**kwargs, state_dict=weights)


def sub_state(state_dict: Mapping[str, Tensor] | None, prefix: str) -> dict[str, Tensor] | None:
    return None if state_dict is None else {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class TextConditioner(Conditioner):
    """Captions -> the frozen text encoder's token embeddings; a dropped caption is "", the same empty
    prompt (or `negative_prompt`) that guidance uses as its unconditional input.

    Batches from a latent cache carry the embeddings already (`batch["context"]`); a dropped one becomes
    the embedding of "".
    """

    kind = "text"
    description = "text-to-image"
    inputs = frozenset({"prompt"})
    required = frozenset({"prompt"})

    def __init__(self, encoder: Mapping[str, Any], drop_rate: float = 0.1, state_dict: Mapping[str, Tensor] | None = None,
                 module: nn.Module | None = None) -> None:
        """`encoder` is the text encoder's config; `state_dict` (`text_encoder.*`) builds it on those weights,
        and `module` is one already built from that config (a Stable Diffusion file's)."""
        super().__init__(drop_rate)
        self.encoder_config = dict(encoder)
        if module is None:
            module = build_text_encoder(encoder, sub_state(state_dict, TEXT_ENCODER_PREFIX))
        self.text_encoder = module.eval().requires_grad_(False)
        self._unconditional: Tensor | None = None

    @property
    def guidable(self) -> bool:
        return True

    @property
    def width(self) -> int:
        return self.text_encoder.output_dim

    def train(self, mode: bool = True) -> "TextConditioner":
        super().train(mode)
        self.text_encoder.eval()
        return self

    def unet_config(self, unet: Mapping[str, Any], latent_channels: int) -> dict[str, Any]:
        if unet.get("context_dim") != self.width:
            raise ConfigError(
                f"The UNet's context_dim ({unet.get('context_dim')}) differs from the text encoder's width "
                f"({self.width}): set model.context_dim={self.width} or pick a matching text_encoder."
            )
        return dict(unet)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], device: torch.device) -> Tensor:
        with torch.autocast(device.type, enabled=False):
            return self.text_encoder(list(captions)).to(device).float()

    def unconditional_context(self, device: torch.device) -> Tensor:
        """The embedding of "" (1 x tokens x width), computed once per device."""
        if self._unconditional is None or self._unconditional.device != device:
            self._unconditional = self.encode_text([""], device)
        return self._unconditional

    def drop_captions(self, captions: Sequence[str], generator: torch.Generator | None = None) -> list[str]:
        drop = self.drop_mask(len(captions), generator)
        return ["" if d else c for c, d in zip(captions, drop.tolist())]

    def context(self, batch: Mapping[str, Any], device: torch.device, dropout: bool) -> Tensor:
        if "context" not in batch:
            captions = self.drop_captions(batch["caption"]) if dropout else batch["caption"]
            return self.encode_text(captions, device)
        context = batch["context"].to(device).float()
        if not dropout:
            return context
        return select(self.drop_mask(context.shape[0]), self.unconditional_context(device), context)

    def forward(self, batch: Mapping[str, Any], codec: LatentCodec, dropout: bool) -> Conditioning:
        return {"crossattn": self.context(batch, codec.device, dropout)}

    def sampling(self, request: SamplingRequest, codec: LatentCodec) -> tuple[Conditioning, Conditioning]:
        prompts = list(request.prompts or [])
        if len(prompts) != request.batch_size:
            raise ValueError(f"{len(prompts)} prompts for {request.batch_size} images")
        device = codec.device
        cond = self.encode_text(prompts, device)
        uncond = self.encode_text([request.negative_prompt] * len(prompts), device)
        return {"crossattn": cond}, {"crossattn": uncond}

    def example_request(self, batch: Mapping[str, Any], prompts: Sequence[str], n: int) -> SamplingRequest:
        prompts = list(prompts or batch["caption"])
        return SamplingRequest(batch_size=len(prompts), prompts=prompts)

    def describe(self) -> dict[str, Any]:
        return {}
