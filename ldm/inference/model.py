"""A trained stage-2 model for generation, as plain modules, loaded without Lightning."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from torch import Tensor, nn

from ldm.checkpoints import read_checkpoint, require_stage, sub_state_dict
from ldm.checkpoints.models import upgrade_stage2_hparams, upgrade_stage2_state
from ldm.checkpoints.io import SAFETENSORS
from ldm.checkpoints.sd_single_file import (
    StableDiffusionFile,
    build_networks,
    is_sd_checkpoint,
    is_sd_state,
    read_sd_file,
    safetensors_header,
    sd_file_from_tensors,
)
from ldm.diffusion.denoiser import Denoiser, check_prediction
from ldm.diffusion.schedule import NoiseSchedule
from ldm.errors import CheckpointError
from ldm.modules.conditioning import Conditioner, TextConditioner, build_conditioner, build_text_encoder
from ldm.modules.latent_codec import LatentCodec

__all__ = ["LatentDiffusionModel", "build_text_encoder", "load_model"]


class LatentDiffusionModel(nn.Module):
    """What generating an image needs: a UNet, the autoencoder and its latent scale, the conditioner (text,
    class, none, inpainting, super-resolution), the noise schedule and what the UNet predicts (eps, v or x0).

    The modules are held, not copied: the training module builds one of these over its own EMA UNet
    for its validation grids.
    """

    def __init__(
        self,
        unet: nn.Module,
        autoencoder: nn.Module,
        conditioner: Conditioner,
        schedule: NoiseSchedule,
        prediction: str,
        scale_factor: Tensor | float,
        image_size: int = 64,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.autoencoder = autoencoder
        self.conditioner = conditioner
        self.schedule = schedule
        self.prediction = check_prediction(prediction)
        if not isinstance(scale_factor, Tensor):
            scale_factor = torch.tensor(float(scale_factor), dtype=torch.float64)
        self.register_buffer("scale_factor", scale_factor)
        self.image_size = int(image_size)
        self.metadata = dict(metadata or {})

    @property
    def device(self) -> torch.device:
        return self.scale_factor.device

    @property
    def codec(self) -> LatentCodec:
        return LatentCodec(self.autoencoder, self.scale_factor)

    def _apply(self, fn, *args, **kwargs):
        """Moves the (non-Module) noise schedule along with the module's tensors."""
        result = super()._apply(fn, *args, **kwargs)
        self.schedule.to(self.scale_factor.device)
        return result

    @property
    def text_encoder(self) -> nn.Module:
        """The text encoder of a text-conditioned model (what SD and diffusers exports carry)."""
        if not isinstance(self.conditioner, TextConditioner):
            raise CheckpointError(f"this is a {self.conditioner.kind}-conditioned model: it has no text encoder")
        return self.conditioner.text_encoder

    def denoiser(self, network: nn.Module | None = None) -> Denoiser:
        """A `Denoiser` over `network(x_t, t)` (the UNet with its conditioning bound, or guided)."""
        return Denoiser(network, self.prediction)


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True, prediction: str | None = None
) -> LatentDiffusionModel:
    """A stage-2 checkpoint of `python train.py stage=ldm`, or a Stable Diffusion 1.x / 2.x single file
    (`.safetensors` or `.ckpt`), as a `LatentDiffusionModel` in eval mode, with the EMA weights of its
    UNet when it has them (`use_ema=False`: the trained weights). Only the chosen UNet is built. The file
    is read once, safely (no code in it runs), and needs no YAML, stage-1 file or download.

    `prediction` ("eps" | "v") is for SD files whose kind does not say it (SD 2.x-base predicts eps; the
    default for 2.x is the 768-v models' v); our checkpoints record theirs."""
    if Path(path).suffix == SAFETENSORS and is_sd_state(safetensors_header(path)[0]):
        return _from_sd_file(read_sd_file(path, use_ema=use_ema, prediction=prediction), device)
    ckpt = read_checkpoint(path)
    if is_sd_checkpoint(ckpt):
        state = ckpt.get("state_dict", ckpt)
        step = ckpt.get("global_step")
        sd = sd_file_from_tensors(list(state), state.__getitem__, path, use_ema=use_ema, prediction=prediction,
                                  global_step=step if isinstance(step, int) else None)
        return _from_sd_file(sd, device)
    require_stage(ckpt, "ldm", path)
    hparams, state = upgrade_stage2_hparams(ckpt["hyper_parameters"]), upgrade_stage2_state(ckpt["state_dict"])
    if prediction is not None and prediction != hparams.get("prediction", "eps"):
        raise CheckpointError(f"{path} records prediction={hparams.get('prediction', 'eps')!r}; prediction= overrides only "
                              "Stable Diffusion single files.")
    autoencoder = hydra.utils.instantiate(hparams["autoencoder"])
    autoencoder.load_state_dict(sub_state_dict(state, "autoencoder."), strict=True)
    conditioner = build_conditioner(hparams["conditioning"], sub_state_dict(state, "conditioner."))
    unet = hydra.utils.instantiate(hparams["model"])
    unet.load_state_dict(sub_state_dict(state, "ema.module." if use_ema else "unet."), strict=True)
    configs = {"unet": hparams["model"], "autoencoder": hparams["autoencoder"], "conditioning": hparams["conditioning"],
               "schedule": hparams["schedule"]}
    if isinstance(conditioner, TextConditioner):
        configs["text_encoder"] = hparams["conditioning"]["encoder"]
    model = LatentDiffusionModel(
        unet=unet,
        autoencoder=autoencoder,
        conditioner=conditioner,
        schedule=hydra.utils.instantiate(hparams["schedule"]),
        prediction=hparams.get("prediction", "eps"),
        scale_factor=state["scale_factor"].to(torch.float64),
        image_size=hparams["autoencoder"].get("resolution", 64),
        metadata={"checkpoint": str(Path(path).resolve()), "global_step": ckpt.get("global_step"),
                  "weights": "ema" if use_ema else "raw", "configs": configs},
    )
    return model.eval().requires_grad_(False).to(device)


def _from_sd_file(sd: StableDiffusionFile, device: str | torch.device) -> LatentDiffusionModel:
    unet, autoencoder, text_encoder = build_networks(sd)
    model = LatentDiffusionModel(
        unet=unet,
        autoencoder=autoencoder,
        conditioner=TextConditioner(sd.text_encoder_config, module=text_encoder),
        schedule=hydra.utils.instantiate(sd.schedule_config),
        prediction=sd.prediction,
        scale_factor=sd.scale_factor,
        image_size=sd.image_size,
        metadata={"checkpoint": str(Path(sd.path).resolve()), "global_step": sd.global_step, "weights": sd.weights,
                  "stable_diffusion": sd.version, "configs": sd.configs()},
    )
    return model.eval().requires_grad_(False).to(device)
