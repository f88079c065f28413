"""What every conditioner is: a batch (or a sampling request) in, what the UNet takes out.

A `Conditioning` is a dict with any of these keys, each batch-first:

- ``"crossattn"``: B x tokens x width, the cross-attention context (text);
- ``"y"``: B class ids, embedded by the UNet's ``label_emb`` and added to the timestep embedding;
- ``"concat"``: B x C x h x w at latent resolution, concatenated to the noisy latent's channels.

A conditioner owns its drop rate (the probability that training replaces a sample's conditioning by the
unconditional value) and that unconditional value, which classifier-free guidance uses at sampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ldm.modules.latent_codec import LatentCodec

Conditioning = dict[str, Tensor]

INPUTS: tuple[str, ...] = ("prompt", "class_label", "image", "mask")
"""The sampling inputs a conditioner may take (sample.py's `prompt`, `class_label`, `init_image`, `mask`)."""


@dataclass(frozen=True)
class SamplingRequest:
    """What one batch of generated images is conditioned on; `batch_size` images."""

    batch_size: int
    prompts: Sequence[str] | None = None
    negative_prompt: str = ""
    class_labels: Sequence[int] | None = None
    image: Tensor | None = None
    """1 or B x 3 x h x w in [-1, 1]: the image to inpaint, or the low-resolution image to upsample."""
    mask: Tensor | None = None
    """1 or B x 1 x H x W in [0, 1], 1 = regenerate."""


def unet_forward(unet: nn.Module, x: Tensor, t: Tensor, cond: Tensor | Mapping[str, Tensor]) -> Tensor:
    """The UNet on a noisy latent under a conditioning (a bare tensor is a cross-attention context)."""
    if isinstance(cond, Tensor):
        return unet(x, t, cond)
    if "concat" in cond:
        x = torch.cat([x, cond["concat"].to(x.dtype)], dim=1)
    if "y" in cond:
        return unet(x, t, cond.get("crossattn"), y=cond["y"])
    return unet(x, t, cond.get("crossattn"))


def select(drop: Tensor, unconditional: Tensor, conditional: Tensor) -> Tensor:
    """Row-wise: `unconditional` where `drop` (B booleans), else `conditional`."""
    return torch.where(drop.to(conditional.device).view(-1, *[1] * (conditional.ndim - 1)), unconditional, conditional)


class Conditioner(nn.Module):
    """The interface the training module and the inference pipeline know conditioners by.

    Class attributes: `kind` names it (the `conditioning` config group's option) and `description` says
    it in words; `inputs` are the sampling inputs (`INPUTS`) it can use and `required` those it cannot
    sample without; `consumes_image`: an init image and a mask are its conditioning, not img2img /
    latent-blending inputs; `upscale`: the generated image is this many times the init image's size.
    """

    kind: ClassVar[str]
    description: ClassVar[str]
    upscale: int = 1
    inputs: ClassVar[frozenset[str]] = frozenset()
    required: ClassVar[frozenset[str]] = frozenset()
    consumes_image: ClassVar[bool] = False

    def __init__(self, drop_rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"conditioning drop_rate must be in [0, 1], got {drop_rate}")
        self.drop_rate = float(drop_rate)

    @property
    def guidable(self) -> bool:
        """Whether classifier-free guidance changes anything (the unconditional value differs)."""
        return False

    def drop_mask(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """B booleans on the CPU: which samples train unconditionally."""
        return torch.rand(n, generator=generator) < self.drop_rate

    def unet_config(self, unet: Mapping[str, Any], latent_channels: int) -> dict[str, Any]:
        """The UNet config this conditioning needs (input channels, class table, context width)."""
        return {**unet, "context_dim": None}

    def forward(self, batch: Mapping[str, Any], codec: LatentCodec, dropout: bool) -> Conditioning:
        """The conditioning of a training batch; with `dropout`, each sample's is the unconditional one with
        probability `drop_rate`."""
        return {}

    def sampling(self, request: SamplingRequest, codec: LatentCodec) -> tuple[Conditioning, Conditioning]:
        """(conditional, unconditional) for classifier-free guidance."""
        return {}, {}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The generated image's size for an input image of this size."""
        return height * self.upscale, width * self.upscale

    def example_request(self, batch: Mapping[str, Any], prompts: Sequence[str], n: int) -> SamplingRequest:
        """What the validation grids show: up to `n` samples conditioned on `prompts` or this batch."""
        return SamplingRequest(batch_size=n)

    def describe(self) -> dict[str, Any]:
        """The settings written into each sampled PNG's metadata."""
        return {"conditioning": self.kind}


def build_conditioner(cfg: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None) -> Conditioner:
    """A conditioner from its config; with `state_dict` (its own keys), its frozen networks are built on
    those weights instead of their configured source (nothing is downloaded or randomly initialised)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return hydra.utils.get_class(cfg["_target_"])(**kwargs, state_dict=state_dict)
