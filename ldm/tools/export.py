"""Export a trained model (or an SD single file) in the layouts other tools read:

    python -m ldm.tools.export ckpt=runs/ldm/<run>/checkpoints/last.ckpt out=model.safetensors        # format=sd
    python -m ldm.tools.export ckpt=runs/ldm/<run>/checkpoints/last.ckpt format=diffusers out=model_diffusers

`format=sd` writes one Stable Diffusion single file (`.safetensors`, SD's key names: the UNet under
`model.diffusion_model.`, the autoencoder under `first_stage_model.`, a last-layer text encoder where SD 1.x
keeps its CLIP, `cond_stage_model.transformer.text_model.`, a penultimate-layer one where SD 2.x keeps its
OpenCLIP, `cond_stage_model.model.`), with our configs in its header so that our loaders read it back
exactly. `format=diffusers` writes a `StableDiffusionPipeline` folder (diffusers and transformers needed).
The config is `configs/export.yaml`.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ldm.errors import ConfigError, LdmError

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
FORMATS = ("sd", "diffusers")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export(cfg: DictConfig) -> Path:
    """Runs export.yaml's settings; returns what was written."""
    from ldm.checkpoints.sd_single_file import save_sd_file
    from ldm.inference.model import load_model

    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format}: one of {', '.join(FORMATS)}.")
    if str(cfg.dtype) not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype}: one of {', '.join(DTYPES)}.")
    out = Path(cfg.out)
    if cfg.format == "sd" and out.suffix != ".safetensors":
        raise ConfigError(f"out={out}: format=sd writes a .safetensors file (e.g. out={out.with_suffix('.safetensors')}).")
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"out={out} exists; pass overwrite=true to replace it.")
    if not Path(cfg.ckpt).is_file():
        raise ConfigError(f"ckpt={cfg.ckpt} does not exist.")
    model = load_model(cfg.ckpt, "cpu", use_ema=bool(cfg.use_ema), prediction=cfg.get("prediction"))
    dtype = DTYPES[str(cfg.dtype)]
    if cfg.format == "sd":
        save_sd_file(out, model.unet, model.autoencoder, model.text_encoder, model.metadata["configs"], model.prediction,
                     model.image_size, float(model.scale_factor), dtype=None if dtype == torch.float32 else dtype)
    else:
        _export_diffusers(model, out, dtype)
    log.info("Wrote %s (format=%s, %s UNet weights, %s) from %s", out, cfg.format, model.metadata.get("weights"), cfg.dtype, cfg.ckpt)
    return out


def _export_diffusers(model, out: Path, dtype: torch.dtype) -> None:
    try:
        from ldm.checkpoints.diffusers import pipeline_to_diffusers
    except ImportError as err:
        raise ConfigError(f"format=diffusers needs diffusers and transformers (pip install -e '.[dev]'): {err}") from None
    try:
        pipeline = pipeline_to_diffusers(model)
    except ValueError as err:
        raise ConfigError(f"format=diffusers: {err}") from None
    if dtype != torch.float32:
        pipeline.to(dtype=dtype)
    temp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(temp, ignore_errors=True)
    pipeline.save_pretrained(str(temp), safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    temp.rename(out)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except LdmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
