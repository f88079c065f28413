"""Networks rebuilt from our own checkpoints: the config and the weights both come from the file."""

from __future__ import annotations

import os
from typing import Any

import hydra
from torch import nn

from ldm.checkpoints.io import read_checkpoint, sub_state_dict
from ldm.checkpoints.stages import require_stage


def autoencoder_from_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike | None = None, hint: str | None = None) -> tuple[nn.Module, dict]:
    """The KLAutoencoder of a stage-1 checkpoint already read, and its config."""
    require_stage(ckpt, "autoencoder", path, hint)
    config = ckpt["hyper_parameters"]["model"]
    autoencoder = hydra.utils.instantiate(config)
    autoencoder.load_state_dict(sub_state_dict(ckpt["state_dict"], "autoencoder."), strict=True)
    return autoencoder, config


def load_autoencoder(path: str | os.PathLike, hint: str | None = None) -> nn.Module:
    """Rebuilds the KLAutoencoder of a stage-1 checkpoint file."""
    return autoencoder_from_checkpoint(read_checkpoint(path), path, hint)[0]
