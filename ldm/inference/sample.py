"""What `python sample.py` does: a stage-2 checkpoint and what its conditioner takes (prompts, class
labels, nothing; optionally an init image and a mask) in; one PNG per image, carrying its settings in PNG
text chunks, and a grid out."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.errors import InstantiationException
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ldm.diffusion.guidance import checked_interval, checked_rescale, checked_scale
from ldm.diffusion.samplers import Sampler
from ldm.diffusion.schedule import NoiseSchedule
from ldm.errors import CheckpointError, SamplingInputError
from ldm.inference.compiled import compile_for_sampling
from ldm.inference.images import image_size_of, load_image, save_png
from ldm.inference.model import LatentDiffusionModel, load_model
from ldm.inference.pipeline import check_image_size, generate_images
from ldm.modules.conditioning import Conditioner

log = logging.getLogger(__name__)

SAMPLER_SHORTCUTS = ("steps", "eta", "spacing", "karras")
"""Documented aliases: top-level options of sample.yaml that, when set, override the same option of the
chosen sampler config (`steps=20` is `sampler.steps=20`)."""


@dataclass
class ImageJob:
    index: int
    prompt: str | None
    seed: int
    class_label: int | None = None

    def metadata(self) -> dict[str, Any]:
        condition = {"prompt": self.prompt} if self.prompt is not None else {}
        if self.class_label is not None:
            condition["class_label"] = self.class_label
        return {**condition, "seed": self.seed}


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


def read_class_labels(value: Any) -> list[int]:
    """`class_label=3` or `class_label=[0,5,7]`."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SamplingInputError(f"class_label={value}: give a class index, e.g. class_label=3, or a list, class_label=[0,3,7].")
    return [int(v) for v in values]


def usage(conditioner: Conditioner) -> str:
    """What a model of this kind is sampled with, in sample.py's words."""
    words = {"prompt": 'prompt="..."', "image": "init_image=PATH", "mask": "mask=PATH (white = regenerate)"}
    num_classes = getattr(conditioner, "num_classes", None)
    words["class_label"] = f"class_label=N (0..{num_classes - 1})" if num_classes else "class_label=N"
    wanted = [words[name] for name in ("prompt", "class_label", "image", "mask") if name in conditioner.required]
    return " ".join(wanted) if wanted else "no prompt (n_samples=N images)"


def read_conditions(cfg: DictConfig, conditioner: Conditioner) -> list[str | int | None]:
    """What each group of n_samples images is conditioned on: prompts, class labels, or nothing (one
    group). Options the model cannot use, and missing ones it needs, stop here in one line."""
    given = {"prompt": bool(cfg.prompt or cfg.prompts_file), "class_label": cfg.get("class_label") is not None,
             "image": bool(cfg.init_image), "mask": bool(cfg.mask)}
    option = {"prompt": "prompt" if cfg.prompt or not cfg.prompts_file else "prompts_file", "class_label": "class_label",
              "image": "init_image", "mask": "mask"}
    article = "an" if conditioner.description[0] in "aeiou" else "a"
    model = f"ckpt={cfg.ckpt} is {article} {conditioner.description} model"
    for name, is_given in given.items():
        if is_given and name not in conditioner.inputs and (conditioner.consumes_image or name not in ("image", "mask")):
            raise SamplingInputError(f"{model}: it takes no {option[name]}; sample it with {usage(conditioner)}.")
    if cfg.negative_prompt and "prompt" not in conditioner.inputs:
        raise SamplingInputError(f"{model}: it takes no negative_prompt; sample it with {usage(conditioner)}.")
    if conditioner.consumes_image and cfg.strength != 1.0:
        raise SamplingInputError(f"{model}: the init image is its conditioning, so strength={cfg.strength} does not apply.")
    missing = [name for name in ("class_label", "image", "mask") if name in conditioner.required and not given[name]]
    if missing:
        raise SamplingInputError(f"{model}: sample it with {usage(conditioner)}.")
    if "prompt" in conditioner.required:
        return read_prompts(cfg.prompt, cfg.prompts_file)
    if "class_label" in conditioner.required:
        return read_class_labels(cfg.class_label)
    return [None]


def load_checkpoint_for_sampling(ckpt: str | None, device: torch.device, use_ema: bool, prediction: str | None = None) -> LatentDiffusionModel:
    if not ckpt:
        raise SamplingInputError("Give the stage-2 checkpoint to sample from: ckpt=runs/ldm/<run>/checkpoints/last.ckpt")
    if not Path(ckpt).is_file():
        raise SamplingInputError(f"ckpt={ckpt} does not exist. Give the path of a checkpoint of `python train.py stage=ldm` "
                                 "or of a Stable Diffusion 1.x / 2.x single file.")
    try:
        return load_model(ckpt, device, use_ema=use_ema, prediction=prediction)
    except CheckpointError as err:
        raise SamplingInputError(str(err)) from err
    except RuntimeError as err:  # strict load_state_dict: weights that do not fit the config stored beside them
        first = str(err).strip().splitlines()[0]
        raise SamplingInputError(f"ckpt={ckpt}: its weights do not fit the model config it carries ({first})") from None
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise SamplingInputError(f"ckpt={ckpt}: the model config it carries cannot be built ({cause})") from None


def sampler_from_config(sampler_cfg: DictConfig, schedule: NoiseSchedule, shortcuts: dict[str, Any]) -> tuple[Sampler, dict[str, Any]]:
    """The sampler of the `sampler` config group over the model's schedule, with the top-level aliases
    (steps, eta, spacing, karras) applied where set. Returns it and its options."""
    options = OmegaConf.to_container(sampler_cfg, resolve=True)
    name = hydra.utils.get_class(options["_target_"]).name
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
    return sampler, {k: v for k, v in options.items() if not k.startswith("_")}


def image_size(cfg: DictConfig, model: LatentDiffusionModel) -> tuple[int, int]:
    """(H, W): as given; else the init image's size (times a super-resolution model's factor); else the
    autoencoder's training resolution."""
    height, width = cfg.H, cfg.W
    if (height is None or width is None) and cfg.init_image:
        init_width, init_height = image_size_of(cfg.init_image)
        init_height, init_width = model.conditioner.output_size(init_height, init_width)
        height, width = height or init_height, width or init_width
    return int(height or model.image_size), int(width or model.image_size)


def plan_jobs(conditions: list[str | int | None], n_samples: int, seed: int) -> list[ImageJob]:
    """Every (condition, sample) pair in order, a condition being a prompt, a class label or None;
    image k gets seed + k."""
    pairs = [condition for condition in conditions for _ in range(n_samples)]
    return [ImageJob(index=k, prompt=c if isinstance(c, str) else None, seed=seed + k, class_label=c if isinstance(c, int) else None)
            for k, c in enumerate(pairs)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SamplingInputError(f"device={name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SamplingInputError(f"device={name}, but no CUDA GPU is available here: use device=cpu or device=auto.")
    return device


def checked_setting(cfg: DictConfig, key: str, check: Callable[[Any], Any]) -> Any:
    """`check(cfg[key])`, its ValueError re-raised as a SamplingInputError that names the key."""
    try:
        return check(cfg[key])
    except ValueError as err:
        raise SamplingInputError(f"{key}={cfg[key]}: {err}") from None


def check_inputs(cfg: DictConfig) -> None:
    """Everything about the command line that can be checked before a model is loaded."""
    if cfg.n_samples < 1 or cfg.batch_size < 1:
        raise SamplingInputError(f"n_samples ({cfg.n_samples}) and batch_size ({cfg.batch_size}) must be at least 1.")
    if cfg.mask and not cfg.init_image:
        raise SamplingInputError("mask=PATH needs init_image=PATH: inpainting regenerates the white part of the mask in that image.")
    if not (isinstance(cfg.strength, (int, float)) and 0.0 <= cfg.strength <= 1.0):
        raise SamplingInputError(f"strength={cfg.strength}: img2img strength must be in [0, 1] (0 keeps the init image, 1 ignores it).")
    if cfg.strength != 1.0 and not cfg.init_image:
        raise SamplingInputError(f"strength={cfg.strength} needs init_image=PATH (img2img).")
    for key in ("init_image", "mask"):
        if cfg[key] and not Path(cfg[key]).is_file():
            raise SamplingInputError(f"{key}={cfg[key]} does not exist.")
    if cfg.mask:
        init_size, mask_size = image_size_of(cfg.init_image), image_size_of(cfg.mask)
        if init_size != mask_size:
            raise SamplingInputError(f"mask={cfg.mask} is {mask_size[0]}x{mask_size[1]} but init_image={cfg.init_image} is "
                                     f"{init_size[0]}x{init_size[1]}: the mask must have the init image's size.")


@torch.no_grad()
def sample(cfg: DictConfig) -> list[Path]:
    """Runs sample.yaml's settings; returns the paths of the image PNGs (the grid is `grid.png` beside them)."""
    check_inputs(cfg)
    guidance_scale = checked_setting(cfg, "guidance_scale", checked_scale)
    checked_setting(cfg, "guidance_rescale", checked_rescale)
    interval = checked_setting(cfg, "guidance_interval", checked_interval)
    device = pick_device(cfg.device)
    model = load_checkpoint_for_sampling(cfg.ckpt, device, bool(cfg.use_ema), cfg.get("prediction"))
    conditioner = model.conditioner
    conditions = read_conditions(cfg, conditioner)
    if cfg.get("compile"):
        model = compile_for_sampling(model, **OmegaConf.to_container(cfg.get("compile_kwargs") or {}, resolve=True))
    height, width = image_size(cfg, model)
    try:
        check_image_size(height, width, model.codec.downsample_factor * conditioner.upscale)
    except ValueError as err:
        raise SamplingInputError(str(err)) from err
    sampler, sampler_options = sampler_from_config(cfg.sampler, model.schedule, {k: cfg.get(k) for k in SAMPLER_SHORTCUTS})
    init_size = (width // conditioner.upscale, height // conditioner.upscale)
    init_image = load_image(cfg.init_image, init_size, "RGB") * 2 - 1 if cfg.init_image else None
    mask = load_image(cfg.mask, (width, height), "L") if cfg.mask else None
    seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    jobs = plan_jobs(conditions, cfg.n_samples, seed)

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "negative_prompt": cfg.negative_prompt,
        "sampler": sampler.name,
        "steps": sampler.steps,
        "guidance_scale": guidance_scale,
        "guidance_rescale": float(cfg.guidance_rescale),
        "guidance_interval": list(interval) if interval else None,
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "sampler_options": sampler_options,
        "H": height,
        "W": width,
        "use_ema": bool(cfg.use_ema),
        "prediction": model.prediction,
        "scale_factor": float(model.scale_factor),
        **conditioner.describe(),
    }
    if cfg.init_image:
        settings.update(init_image=str(Path(cfg.init_image).resolve()), strength=float(cfg.strength))
    if cfg.mask:
        settings["mask"] = str(Path(cfg.mask).resolve())
    log.info("Sampling %d image(s) of %dx%d with %r, guidance %.2f, seeds %d..%d", len(jobs), width, height, sampler, guidance_scale, seed, seed + len(jobs) - 1)

    paths, images = [], []
    progress = tqdm(total=len(jobs), desc="images", unit="img", disable=not cfg.progress)
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start : start + cfg.batch_size]
        decoded = generate_images(
            model,
            sampler,
            [job.prompt for job in batch] if "prompt" in conditioner.inputs else None,
            [job.seed for job in batch],
            height=height,
            width=width,
            class_labels=[job.class_label for job in batch] if "class_label" in conditioner.inputs else None,
            guidance_scale=guidance_scale,
            guidance_rescale=float(cfg.guidance_rescale),
            guidance_interval=interval,
            negative_prompt=cfg.negative_prompt,
            init_image=init_image,
            strength=float(cfg.strength),
            mask=mask,
            progress=bool(cfg.progress),
        )
        for job, image in zip(batch, ((decoded.float().cpu() + 1) / 2).clamp(0, 1)):
            path = out_dir / f"{job.index:05d}-seed{job.seed}.png"
            save_png(image, path, {**job.metadata(), **settings})
            paths.append(path)
            images.append(image)
        progress.update(len(batch))
    progress.close()

    nrow = cfg.n_samples if len(conditions) > 1 else min(cfg.n_samples, 8)
    grid = make_grid(torch.stack(images), nrow=nrow, padding=2, pad_value=1.0)
    if "prompt" in conditioner.inputs:
        grid_conditions = {"prompts": conditions}
    else:
        grid_conditions = {"class_labels": conditions} if "class_label" in conditioner.inputs else {}
    save_png(grid, out_dir / "grid.png", {**grid_conditions, "seeds": [job.seed for job in jobs], **settings})
    log.info("Wrote %d image(s) and grid.png to %s", len(paths), out_dir)
    return paths
