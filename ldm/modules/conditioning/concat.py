"""Conditionings concatenated to the noisy latent: inpainting (SD-inpainting style) and super-resolution
(CompVis `sr_bsr` style). Each wraps a `base` conditioner (text, class or none) for what it does not
concatenate; the concatenated channels are the same in the conditional and unconditional branches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.errors import SamplingInputError
from ldm.modules.conditioning.base import Conditioner, Conditioning, SamplingRequest, build_conditioner
from ldm.modules.conditioning.degradation import Degradation, downsample
from ldm.modules.conditioning.masks import random_masks
from ldm.modules.latent_codec import LatentCodec

BASE_PREFIX = "base."
UNCONDITIONAL = {"_target_": "ldm.modules.conditioning.Unconditional"}


def _batched(tensor: Tensor, n: int) -> Tensor:
    return tensor.expand(n, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor


class _ConcatConditioner(Conditioner):
    consumes_image = True

    def __init__(self, base: Mapping[str, Any] | None, state_dict: Mapping[str, Tensor] | None) -> None:
        super().__init__(0.0)
        base_state = None if state_dict is None else {k[len(BASE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BASE_PREFIX)}
        self.base = build_conditioner(base or UNCONDITIONAL, base_state)
        self.drop_rate = self.base.drop_rate
        self.inputs = self.base.inputs | {"image"}
        self.required = self.base.required | {"image"}

    @property
    def guidable(self) -> bool:
        return self.base.guidable

    def concat_channels(self, latent_channels: int) -> int:
        raise NotImplementedError

    def unet_config(self, unet: Mapping[str, Any], latent_channels: int) -> dict[str, Any]:
        config = self.base.unet_config(unet, latent_channels)
        return {**config, "in_channels": int(config.get("out_channels", latent_channels)) + self.concat_channels(latent_channels)}

    def _with(self, cond: Conditioning, concat: Tensor) -> Conditioning:
        return {**cond, "concat": concat}


class InpaintingConditioner(_ConcatConditioner):
    """The UNet sees [noisy latent, mask at latent resolution, latent of the masked image]: 9 channels for
    a 4-channel latent, in the order of CompVis' `LatentInpaintDiffusion`. Training draws random masks
    (`random_masks`: whole image, boxes, strokes); the masked image keeps the pixels outside the mask
    and is 0 (mid-grey) inside. The base (text by default) is dropped for guidance, the image never."""

    kind = "inpaint"
    description = "inpainting"

    def __init__(self, base: Mapping[str, Any] | None = None, p_whole: float = 0.25, p_box: float = 0.375,
                 state_dict: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(base, state_dict)
        self.p_whole, self.p_box = float(p_whole), float(p_box)
        self.inputs = self.inputs | {"mask"}
        self.required = self.required | {"mask"}

    def concat_channels(self, latent_channels: int) -> int:
        return 1 + latent_channels

    @staticmethod
    def masked_image(image: Tensor, mask: Tensor) -> Tensor:
        return image * (mask < 0.5)

    def concat(self, image: Tensor, mask: Tensor, codec: LatentCodec) -> Tensor:
        """[mask at latent resolution (a latent pixel is masked if any pixel it covers is), masked image's latent]."""
        device = codec.device
        image, mask = image.to(device).float(), mask.to(device).float()
        latent = codec.encode(self.masked_image(image, mask), sample=False)
        small = F.adaptive_max_pool2d(mask, latent.shape[-2:])
        return torch.cat([(small > 0.5).float(), latent], dim=1)

    def forward(self, batch: Mapping[str, Any], codec: LatentCodec, dropout: bool) -> Conditioning:
        image = batch["image"]
        if "mask" in batch:
            mask = batch["mask"]
        else:
            mask = random_masks(image.shape[0], image.shape[-2], image.shape[-1], p_whole=self.p_whole, p_box=self.p_box)
        return self._with(self.base(batch, codec, dropout), self.concat(image, mask, codec))

    def sampling(self, request: SamplingRequest, codec: LatentCodec) -> tuple[Conditioning, Conditioning]:
        if request.image is None or request.mask is None:
            raise SamplingInputError("an inpainting model needs init_image=PATH and mask=PATH (white = regenerate).")
        n = request.batch_size
        concat = _batched(self.concat(request.image, request.mask, codec), n)
        cond, uncond = self.base.sampling(request, codec)
        return self._with(cond, concat), self._with(uncond, concat)

    def example_request(self, batch: Mapping[str, Any], prompts: Sequence[str], n: int) -> SamplingRequest:
        """The first `n` validation images, the middle half of each side regenerated."""
        image = batch["image"][:n]
        n = image.shape[0]
        height, width = image.shape[-2:]
        mask = torch.zeros(n, 1, height, width)
        mask[..., height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
        base = self.base.example_request(batch, list(batch.get("caption", []))[:n], n)
        return SamplingRequest(batch_size=n, prompts=base.prompts, class_labels=base.class_labels, image=image, mask=mask)

    def describe(self) -> dict[str, Any]:
        return {"conditioning": self.kind, **{k: v for k, v in self.base.describe().items() if k != "conditioning"}}


class SuperResolutionConditioner(_ConcatConditioner):
    """The low-resolution image (the target bicubic-downsampled by `factor`; in training optionally
    blurred first, then noised and JPEG-compressed, each by a random amount up to its setting:
    `degradation.Degradation`), resized to the latent's size and concatenated (3 channels). Sampling
    upsamples an image by `factor`."""

    kind = "superres"
    description = "super-resolution"

    def __init__(self, factor: int = 4, noise_level: float = 0.0, blur: float = 0.0, jpeg_quality: int | None = None,
                 base: Mapping[str, Any] | None = None, state_dict: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(base, state_dict)
        if factor < 1:
            raise ValueError(f"conditioning.factor must be at least 1, got {factor}")
        self.factor = int(factor)
        self.degradation = Degradation(blur=blur, noise_level=noise_level, jpeg_quality=jpeg_quality)
        self.upscale = self.factor

    def concat_channels(self, latent_channels: int) -> int:
        return 3

    def low_resolution(self, image: Tensor) -> Tensor:
        """What the model upsamples: the image bicubic-downsampled by `factor` (antialiased), in [-1, 1]."""
        return downsample(image, self.factor)

    def training_input(self, image: Tensor) -> Tensor:
        """The low-resolution image degraded at random as configured (clean when nothing is)."""
        return self.degradation(image, self.factor)

    @staticmethod
    def concat(low: Tensor, latent_hw: tuple[int, int], codec: LatentCodec) -> Tensor:
        return F.interpolate(low.to(codec.device).float(), size=latent_hw, mode="bicubic", align_corners=False).clamp(-1, 1)

    def forward(self, batch: Mapping[str, Any], codec: LatentCodec, dropout: bool) -> Conditioning:
        image = batch["image"]
        low = self.training_input(image) if dropout else self.low_resolution(image)
        latent_hw = (image.shape[-2] // codec.downsample_factor, image.shape[-1] // codec.downsample_factor)
        return self._with(self.base(batch, codec, dropout), self.concat(low, latent_hw, codec))

    def sampling(self, request: SamplingRequest, codec: LatentCodec) -> tuple[Conditioning, Conditioning]:
        if request.image is None:
            raise SamplingInputError(f"a super-resolution model needs init_image=PATH: the image to upsample ×{self.factor}.")
        height, width = self.output_size(*request.image.shape[-2:])
        latent_hw = (height // codec.downsample_factor, width // codec.downsample_factor)
        concat = _batched(self.concat(request.image, latent_hw, codec), request.batch_size)
        cond, uncond = self.base.sampling(request, codec)
        return self._with(cond, concat), self._with(uncond, concat)

    def example_request(self, batch: Mapping[str, Any], prompts: Sequence[str], n: int) -> SamplingRequest:
        low = self.low_resolution(batch["image"][:n])
        n = low.shape[0]
        base = self.base.example_request(batch, list(batch.get("caption", []))[:n], n)
        return SamplingRequest(batch_size=n, prompts=base.prompts, class_labels=base.class_labels, image=low)

    def describe(self) -> dict[str, Any]:
        return {"conditioning": self.kind, "factor": self.factor, **{k: v for k, v in self.base.describe().items() if k != "conditioning"}}
