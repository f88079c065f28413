"""Class-conditional and unconditional models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.errors import ConfigError, SamplingInputError
from ldm.modules.conditioning.base import Conditioner, Conditioning, SamplingRequest
from ldm.modules.latent_codec import LatentCodec


class ClassConditioner(Conditioner):
    """A class id per image, embedded by a learned table in the UNet (`label_emb`, added to the timestep
    embedding, as in the CompVis class-conditional models) with one extra row, the null class
    `num_classes`: a dropped label trains it, and guidance uses it as the unconditional input.

    The table lives in the UNet so that it is trained, averaged by the EMA and saved with it.
    """

    kind = "class"
    description = "class-conditional"
    inputs = frozenset({"class_label"})
    required = frozenset({"class_label"})

    def __init__(self, num_classes: int, drop_rate: float = 0.1, label_key: str = "label",
                 state_dict: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(drop_rate)
        if num_classes < 1:
            raise ConfigError(f"conditioning.num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.label_key = label_key

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def guidable(self) -> bool:
        return True

    def unet_config(self, unet: Mapping[str, Any], latent_channels: int) -> dict[str, Any]:
        return {**unet, "context_dim": None, "num_classes": self.num_classes + 1}

    def check_labels(self, labels: Tensor) -> Tensor:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise SamplingInputError(f"class labels must be in 0..{self.num_classes - 1} (this model has {self.num_classes} classes), "
                                     f"got {sorted(set(labels.tolist()))}")
        return labels

    def forward(self, batch: Mapping[str, Any], codec: LatentCodec, dropout: bool) -> Conditioning:
        if self.label_key not in batch:
            raise ConfigError(f"conditioning=class needs class labels in batch[{self.label_key!r}]; this dataset gives "
                              f"{sorted(batch)} (data=shapes and data=emoji have labels).")
        labels = torch.as_tensor(batch[self.label_key]).long()
        if dropout:
            labels = torch.where(self.drop_mask(labels.shape[0]).to(labels.device), self.null_class, labels)
        return {"y": labels.to(codec.device)}

    def sampling(self, request: SamplingRequest, codec: LatentCodec) -> tuple[Conditioning, Conditioning]:
        labels = self.check_labels(torch.as_tensor(list(request.class_labels or []), dtype=torch.long))
        if labels.shape[0] != request.batch_size:
            raise ValueError(f"{labels.shape[0]} class labels for {request.batch_size} images")
        labels = labels.to(codec.device)
        return {"y": labels}, {"y": torch.full_like(labels, self.null_class)}

    def example_request(self, batch: Mapping[str, Any], prompts: Sequence[str], n: int) -> SamplingRequest:
        labels = [k % self.num_classes for k in range(n)]
        return SamplingRequest(batch_size=n, class_labels=labels)

    def describe(self) -> dict[str, Any]:
        return {"conditioning": self.kind, "num_classes": self.num_classes}


class Unconditional(Conditioner):
    """No conditioning: the UNet's cross-attention layers attend to the image itself."""

    kind = "none"
    description = "unconditional"

    def __init__(self, state_dict: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(0.0)
