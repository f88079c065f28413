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
from ldm.diffusion.denoiser import Denoiser, check_prediction
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.latent_codec import LatentCodec


def build_text_encoder(cfg: Mapping[str, Any], weights: Mapping[str, Tensor] | None = None) -> nn.Module:
    """The configured text encoder; with `weights`, built directly on them.

    The config is kept as trained (its `pretrained` tag, for one, decides QuickGELU vs GELU for
    OpenAI CLIP towers), and nothing is downloaded or randomly initialised first.
    """
    if weights is None:
        return hydra.utils.instantiate(dict(cfg))
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return hydra.utils.get_class(cfg["_target_"])(**kwargs, state_dict=weights)


class LatentDiffusionModel(nn.Module):
    """What generating an image needs: a UNet, the autoencoder and its latent scale, the text encoder,
    the noise schedule and what the UNet predicts (eps, v or x0).

    The modules are held, not copied: the training module builds one of these over its own EMA UNet
    for its validation grids.
    """

    def __init__(
        self,
        unet: nn.Module,
        autoencoder: nn.Module,
        text_encoder: nn.Module,
        schedule: NoiseSchedule,
        prediction: str,
        scale_factor: Tensor | float,
        image_size: int = 64,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
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

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return self.text_encoder(list(captions)).to(self.device).float()

    def denoiser(self, network: nn.Module | None = None) -> Denoiser:
        """A `Denoiser` over `network(x_t, t)` (the UNet with its conditioning bound, or guided)."""
        return Denoiser(network, self.prediction)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True) -> LatentDiffusionModel:
    """A stage-2 checkpoint of `python train.py stage=ldm` as a `LatentDiffusionModel` in eval mode,
    with the EMA weights of its UNet (`use_ema=False`: the trained weights). Only the chosen UNet is
    built. The file is read once, safely (no code in it runs), and needs no YAML, stage-1 file or download."""
    ckpt = read_checkpoint(path)
    require_stage(ckpt, "ldm", path)
    hparams, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    autoencoder = hydra.utils.instantiate(hparams["autoencoder"])
    autoencoder.load_state_dict(sub_state_dict(state, "autoencoder."), strict=True)
    text_encoder = build_text_encoder(hparams["text_encoder"], sub_state_dict(state, "text_encoder."))
    unet = hydra.utils.instantiate(hparams["model"])
    unet.load_state_dict(sub_state_dict(state, "ema.module." if use_ema else "unet."), strict=True)
    model = LatentDiffusionModel(
        unet=unet,
        autoencoder=autoencoder,
        text_encoder=text_encoder,
        schedule=hydra.utils.instantiate(hparams["schedule"]),
        prediction=hparams.get("prediction", "eps"),
        scale_factor=state["scale_factor"].to(torch.float64),
        image_size=hparams["autoencoder"].get("resolution", 64),
        metadata={"checkpoint": str(Path(path).resolve()), "global_step": ckpt.get("global_step"), "weights": "ema" if use_ema else "raw"},
    )
    return model.eval().requires_grad_(False).to(device)
