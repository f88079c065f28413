"""Networks rebuilt from our own checkpoints: the config and the weights both come from the file."""

from __future__ import annotations

import os
from collections.abc import Mapping
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


TEXT_CONDITIONER = "ldm.modules.conditioning.TextConditioner"
LEGACY_TEXT_PREFIX, TEXT_PREFIX = "text_encoder.", "conditioner.text_encoder."


def upgrade_stage2_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A stage-2 state dict in today's layout: checkpoints written before conditioners existed kept the
    text encoder at `text_encoder.*`, now `conditioner.text_encoder.*` (same tensors)."""
    return {(TEXT_PREFIX + k[len(LEGACY_TEXT_PREFIX):] if k.startswith(LEGACY_TEXT_PREFIX) else k): v for k, v in state.items()}


def upgrade_stage2_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Stage-2 hyperparameters with a `conditioning` config: a checkpoint written before conditioners
    existed is text-conditioned by its `text_encoder` with `caption_dropout`."""
    hparams = dict(hparams)
    if "conditioning" not in hparams:
        hparams["conditioning"] = {"_target_": TEXT_CONDITIONER, "encoder": hparams.pop("text_encoder"),
                                   "drop_rate": hparams.pop("caption_dropout", 0.1)}
    return hparams
