"""Loading our own checkpoints (and Stable Diffusion ones) with clear errors for the wrong file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import hydra
import torch
from torch import nn

SD_PREFIXES = {"autoencoder": "first_stage_model.", "unet": "model.diffusion_model.", "text_encoder": "cond_stage_model."}


class CheckpointStageError(ValueError):
    """A checkpoint of one stage was given where another stage's is needed."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a Lightning `.ckpt` or a `.safetensors` file into a dict (safetensors: {"state_dict": ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {"state_dict": load_file(str(path))}
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_stage(ckpt: dict[str, Any]) -> str | None:
    return ckpt.get("ldm_stage") or ckpt.get("hyper_parameters", {}).get("stage")


def require_stage(ckpt: dict[str, Any], expected: str, path: str | Path, hint: str = "") -> None:
    stage = checkpoint_stage(ckpt)
    if stage != expected:
        what = f"a {stage!r} checkpoint" if stage else "not a checkpoint written by ldm's train.py"
        raise CheckpointStageError(f"{path} is {what}; a {expected!r} checkpoint is needed here. {hint}".strip())


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes and bytes, in name order): the same for the
    same weights however they were loaded, different after any change. Identifies which encoders made a
    latent cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_autoencoder(path: str | Path) -> nn.Module:
    """Rebuilds the KLAutoencoder of a stage-1 checkpoint (config and weights come from the file)."""
    ckpt = read_checkpoint(path)
    require_stage(ckpt, "autoencoder", path, hint="Train one with `python train.py stage=autoencoder`.")
    autoencoder = hydra.utils.instantiate(ckpt["hyper_parameters"]["model"])
    autoencoder.load_state_dict(sub_state_dict(ckpt["state_dict"], "autoencoder."), strict=True)
    return autoencoder


def load_sd_state_dict(path: str | Path, component: str) -> dict[str, torch.Tensor]:
    """One component ("autoencoder", "unet", "text_encoder") of a Stable Diffusion `.ckpt`/`.safetensors`,
    with its SD prefix stripped, ready for a strict `load_state_dict` into our matching module."""
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    prefix = SD_PREFIXES[component]
    sub = sub_state_dict(state, prefix)
    if not sub:
        raise KeyError(f"{path} has no `{prefix}*` weights: it is not a Stable Diffusion checkpoint with a {component}.")
    return sub
