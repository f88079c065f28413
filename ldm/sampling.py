"""What `python sample.py` does: a stage-2 checkpoint, prompts (and optionally an init image and a
mask) in; one PNG per image, carrying its settings in PNG text chunks, and a grid out."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ldm.checkpoints import CheckpointStageError
from ldm.diffusion.guidance import checked_interval, checked_rescale
from ldm.diffusion.samplers import SAMPLERS, Sampler
from ldm.pipeline import check_image_size, generate_images
from ldm.training.ldm_module import LatentDiffusionModule

log = logging.getLogger(__name__)

SAMPLER_SHORTCUTS = ("steps", "eta", "spacing", "karras")
"""Top-level options of sample.yaml that, when set, override the chosen sampler's own."""


class SamplingInputError(ValueError):
    """Bad user input to sample.py: reported as one line, without a traceback."""


@dataclass
class ImageJob:
    index: int
    prompt: str
    seed: int


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    if bool(prompt) == bool(prompts_file):
        raise SamplingInputError('Give exactly one of prompt="..." or prompts_file=PATH (one prompt a line).')
    if prompt:
        return [str(prompt)]
    path = Path(prompts_file)
    if not path.is_file():
        raise SamplingInputError(f"prompts_file={prompts_file} does not exist.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SamplingInputError(f"prompts_file={prompts_file} has no prompts (one prompt a line).")
    return prompts


def load_model(ckpt: str | None, device: torch.device) -> LatentDiffusionModule:
    if not ckpt:
        raise SamplingInputError("Give the stage-2 checkpoint to sample from: ckpt=runs/ldm/<run>/checkpoints/last.ckpt")
    if not Path(ckpt).is_file():
        raise SamplingInputError(f"ckpt={ckpt} does not exist. Give the path of a checkpoint of `python train.py stage=ldm`.")
    try:
        return LatentDiffusionModule.from_checkpoint(ckpt, map_location=device)
    except CheckpointStageError as err:
        raise SamplingInputError(str(err)) from err


def sampler_name(target: str) -> str:
    """The config-group name ("ddim", "euler_a", ...) of a sampler class path."""
    cls = hydra.utils.get_class(target)
    return next((name for name, known in SAMPLERS.items() if known is cls), cls.__name__)


def sampler_from_config(sampler_cfg: DictConfig, schedule: Any, prediction: str, shortcuts: dict[str, Any]) -> tuple[str, Sampler, dict[str, Any]]:
    """The sampler of the `sampler` config group over the model's schedule and prediction type (eps or
    v, whatever the sampler config says), with the top-level shortcuts (steps, eta, spacing, karras)
    applied where set. Returns its name, itself and its options."""
    options = OmegaConf.to_container(sampler_cfg, resolve=True)
    name = sampler_name(options["_target_"])
    options["prediction"] = prediction
    for key, value in shortcuts.items():
        if value is None:
            continue
        if key not in options:
            takes = sorted(k for k in options if not k.startswith("_"))
            raise SamplingInputError(f"{key}={value} does not apply to sampler={name} (its options: {', '.join(takes)}).")
        options[key] = value
    try:
        sampler = hydra.utils.instantiate(options)(schedule=schedule)
    except (ValueError, TypeError) as err:
        raise SamplingInputError(f"sampler={name}: {err}") from err
    if "spacing" in options:
        options["spacing"] = sampler.spacing
    return name, sampler, {k: v for k, v in options.items() if not k.startswith("_")}


def load_image(path: str, size: tuple[int, int] | None, mode: str) -> Tensor:
    """An image file as a 1 x C x H x W tensor in [0, 1], resized to `size` (W, H) if given."""
    if not Path(path).is_file():
        raise SamplingInputError(f"{path} does not exist.")
    image = Image.open(path).convert(mode)
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS if mode == "RGB" else Image.Resampling.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (array.permute(2, 0, 1) if array.ndim == 3 else array[None])[None]


def to_pil(image: Tensor) -> Image.Image:
    """C x H x W in [0, 1] -> 8-bit RGB."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def png_info(metadata: dict[str, Any]) -> PngInfo:
    """PNG text chunks: strings as they are, anything else as JSON."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    return info


def save_png(image: Tensor, path: Path, metadata: dict[str, Any]) -> None:
    to_pil(image).save(path, pnginfo=png_info(metadata))


def image_size(cfg: DictConfig, model: LatentDiffusionModule) -> tuple[int, int]:
    """(H, W): as given; else the init image's size; else the autoencoder's training resolution."""
    height, width = cfg.H, cfg.W
    if (height is None or width is None) and cfg.init_image:
        if not Path(cfg.init_image).is_file():
            raise SamplingInputError(f"init_image={cfg.init_image} does not exist.")
        init_width, init_height = Image.open(cfg.init_image).size
        height, width = height or init_height, width or init_width
    resolution = model.hparams.autoencoder.get("resolution", 64)
    return int(height or resolution), int(width or resolution)


def plan_jobs(prompts: list[str], n_samples: int, seed: int) -> list[ImageJob]:
    """Every (prompt, sample) pair in order; image k gets seed + k."""
    pairs = [prompt for prompt in prompts for _ in range(n_samples)]
    return [ImageJob(index=k, prompt=prompt, seed=seed + k) for k, prompt in enumerate(pairs)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def checked_setting(cfg: DictConfig, key: str, check: Callable[[Any], Any]) -> Any:
    """`check(cfg[key])`, its ValueError re-raised as a SamplingInputError that names the key."""
    try:
        return check(cfg[key])
    except ValueError as err:
        raise SamplingInputError(f"{key}={cfg[key]}: {err}") from None


@torch.no_grad()
def sample(cfg: DictConfig) -> list[Path]:
    """Runs sample.yaml's settings; returns the paths of the image PNGs (the grid is `grid.png` beside them)."""
    if cfg.n_samples < 1 or cfg.batch_size < 1:
        raise SamplingInputError(f"n_samples ({cfg.n_samples}) and batch_size ({cfg.batch_size}) must be at least 1.")
    if cfg.mask and not cfg.init_image:
        raise SamplingInputError("mask=PATH needs init_image=PATH: inpainting regenerates the white part of the mask in that image.")
    if cfg.strength != 1.0 and not cfg.init_image:
        raise SamplingInputError(f"strength={cfg.strength} needs init_image=PATH (img2img).")
    checked_setting(cfg, "guidance_rescale", checked_rescale)
    interval = checked_setting(cfg, "guidance_interval", checked_interval)
    prompts = read_prompts(cfg.prompt, cfg.prompts_file)
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt, device)
    height, width = image_size(cfg, model)
    try:
        check_image_size(height, width, model.autoencoder.downsample_factor)
    except ValueError as err:
        raise SamplingInputError(str(err)) from err
    name, sampler, sampler_options = sampler_from_config(cfg.sampler, model.schedule, model.hparams.prediction, {k: cfg.get(k) for k in SAMPLER_SHORTCUTS})
    init_image = load_image(cfg.init_image, (width, height), "RGB") * 2 - 1 if cfg.init_image else None
    mask = load_image(cfg.mask, (width, height), "L") if cfg.mask else None
    seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    jobs = plan_jobs(prompts, cfg.n_samples, seed)

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "negative_prompt": cfg.negative_prompt,
        "sampler": name,
        "steps": sampler.steps,
        "guidance_scale": float(cfg.guidance_scale),
        "guidance_rescale": float(cfg.guidance_rescale),
        "guidance_interval": list(interval) if interval else None,
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "sampler_options": sampler_options,
        "H": height,
        "W": width,
        "use_ema": bool(cfg.use_ema),
    }
    if cfg.init_image:
        settings.update(init_image=str(Path(cfg.init_image).resolve()), strength=float(cfg.strength))
    if cfg.mask:
        settings["mask"] = str(Path(cfg.mask).resolve())
    log.info("Sampling %d image(s) of %dx%d with %r, guidance %.2f, seeds %d..%d", len(jobs), width, height, sampler, cfg.guidance_scale, seed, seed + len(jobs) - 1)

    paths, images = [], []
    progress = tqdm(total=len(jobs), desc="images", unit="img", disable=not cfg.progress)
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start : start + cfg.batch_size]
        decoded = generate_images(
            model,
            sampler,
            [job.prompt for job in batch],
            [job.seed for job in batch],
            height=height,
            width=width,
            guidance_scale=float(cfg.guidance_scale),
            guidance_rescale=float(cfg.guidance_rescale),
            guidance_interval=interval,
            negative_prompt=cfg.negative_prompt,
            use_ema=bool(cfg.use_ema),
            init_image=init_image,
            strength=float(cfg.strength),
            mask=mask,
            progress=bool(cfg.progress),
        )
        for job, image in zip(batch, ((decoded.float().cpu() + 1) / 2).clamp(0, 1)):
            path = out_dir / f"{job.index:05d}-seed{job.seed}.png"
            save_png(image, path, {"prompt": job.prompt, "seed": job.seed, **settings})
            paths.append(path)
            images.append(image)
        progress.update(len(batch))
    progress.close()

    nrow = cfg.n_samples if len(prompts) > 1 else min(cfg.n_samples, 8)
    grid = make_grid(torch.stack(images), nrow=nrow, padding=2, pad_value=1.0)
    save_png(grid, out_dir / "grid.png", {"prompts": prompts, "seeds": [job.seed for job in jobs], **settings})
    log.info("Wrote %d image(s) and grid.png to %s", len(paths), out_dir)
    return paths
