"""Does a trained text-to-image model draw what its prompt says? Measured on the shapes dataset.

`evaluate_detector` first shows that the procedural detector (`ldm.evaluation.shapes_detector`) can be
trusted to judge generated images: it reads the attributes of real val-split shapes back both from the
clean images and from the autoencoder's reconstructions (posterior mean -> decode), whose look the
generator's samples share; the reconstruction PSNR comes with it.

`evaluate_generation` draws N captions from attribute combinations (a share of them from the (colour,
shape) pairs held out of training, `DEFAULT_HOLDOUT`; the rest from the val split's distribution),
samples one image per caption at each guidance scale from the same seeds, and scores the detector's
reading of each image against its caption: accuracies per attribute for seen and held-out
combinations and overall, with chance levels and binomial 95% half-widths.

`benchmarks/prompt_following.py` is the command line over these. Nothing here imports Lightning or
`ldm.training`: the model is loaded by `ldm.inference`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ldm.checkpoints import load_autoencoder, read_checkpoint
from ldm.data.shapes import BACKGROUNDS, DEFAULT_HOLDOUT, POSITIONS, SHAPE_COLOURS, SHAPES, SIZES, ShapesDataset, caption_from_attributes
from ldm.diffusion import Sampler, build_sampler
from ldm.evaluation.shapes_detector import ATTRIBUTES, score
from ldm.inference import LatentDiffusionModel, generate_images, load_model
from ldm.inference.images import png_info, to_pil
from ldm.inference.sample import pick_device

COLUMNS: tuple[str, ...] = (*ATTRIBUTES, "all")
CHANCE: dict[str, float] = {
    "colour": 1 / len(SHAPE_COLOURS),
    "shape": 1 / len(SHAPES),
    "size": 1 / len(SIZES),
    "position": 1 / len(POSITIONS),
    "background": 1 / len(BACKGROUNDS),
}
CHANCE["all"] = math.prod(CHANCE.values())
"""Accuracy of a uniform guess over each attribute's vocabulary."""

GRID_SAMPLES = 32
GRID_COLUMNS = 8
LABEL_WIDTH = 64
TRUSTED_ACCURACY = 0.95
"""The detector must read at least this share of every attribute off reconstructions to judge a generator."""


@dataclass(frozen=True)
class PromptCase:
    """One caption to draw: its attributes, whether its (colour, shape) was held out of training, its seed."""

    attributes: dict[str, str]
    held_out: bool
    seed: int

    @property
    def prompt(self) -> str:
        return caption_from_attributes(self.attributes)


def draw_cases(n: int, seed: int, holdout_fraction: float) -> list[PromptCase]:
    """``n`` captions in a seeded random order; ``round(n * holdout_fraction)`` of them use a held-out pair.

    The attributes come from ``ShapesDataset``'s own "val" and "holdout" splits (drawn with ``seed``),
    so they follow the distribution the model was validated on (e.g. no shape on a background of its
    own colour). Case ``k`` gets the seed ``seed + k``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0.0 <= holdout_fraction <= 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1], got {holdout_fraction}")
    n_held_out = round(n * holdout_fraction)
    drawn = []
    for split, count in (("val", n - n_held_out), ("holdout", n_held_out)):
        if count:
            dataset = ShapesDataset(length=count, split=split, seed=seed, holdout=DEFAULT_HOLDOUT, cache=False)
            drawn += [(dataset.attributes(i), split == "holdout") for i in range(count)]
    order = np.random.default_rng(seed).permutation(n)
    return [PromptCase(attributes=drawn[j][0], held_out=drawn[j][1], seed=seed + k) for k, j in enumerate(order)]


def binomial_half_width(accuracy: float, count: int) -> float:
    """Half-width of the normal-approximation 95% interval of a proportion measured on ``count`` trials."""
    return 1.96 * math.sqrt(accuracy * (1.0 - accuracy) / count)


def subset_scores(images: Tensor, cases: Sequence[PromptCase]) -> dict[str, dict[str, float] | None]:
    """Accuracies (``score``) on the seen cases, the held-out ones and all; None for an empty subset."""
    subsets = {
        "seen": [k for k, case in enumerate(cases) if not case.held_out],
        "held_out": [k for k, case in enumerate(cases) if case.held_out],
        "overall": list(range(len(cases))),
    }
    return {
        name: score(images[index], [cases[k].attributes for k in index]) if index else None
        for name, index in subsets.items()
    }


def load_for_evaluation(ckpt: str | os.PathLike, device: str | torch.device, use_ema: bool = True) -> LatentDiffusionModel:
    """The stage-2 model to judge, in eval mode on ``device``: its EMA UNet, or with ``use_ema=False``
    the trained weights (the choice is made at load time, so only that UNet is built)."""
    return load_model(ckpt, device, use_ema=use_ema)


def training_steps(ckpt_path: str | os.PathLike) -> int | None:
    """Training steps behind a checkpoint: autoencoder updates for stage 1 (whose ``global_step`` also
    counts the discriminator's optimizer steps), ``global_step`` otherwise."""
    ckpt = read_checkpoint(ckpt_path)
    return ckpt.get("generator_step", ckpt.get("global_step"))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample_cases(
    model: LatentDiffusionModel,
    sampler: Sampler,
    cases: Sequence[PromptCase],
    guidance_scale: float,
    size: int,
    batch_size: int,
    progress: tqdm | None = None,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
) -> Tensor:
    """One ``size x size`` image per case (its prompt, its seed), in [-1, 1] on the CPU, in batches.

    Image k depends on case k alone (``generate_images`` seeds every image's noise by itself), so the
    images are the same whatever ``batch_size``.
    """
    images = []
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        decoded = generate_images(
            model,
            sampler,
            [case.prompt for case in batch],
            [case.seed for case in batch],
            height=size,
            width=size,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            guidance_interval=guidance_interval,
        )
        images.append(decoded.float().cpu())
        if progress is not None:
            progress.update(len(batch))
    return torch.cat(images)


def save_grid(path: str | Path, images_by_scale: dict[float, Tensor], cases: Sequence[PromptCase], settings: dict[str, Any]) -> None:
    """The first 32 samples of every guidance scale, one block of rows per scale, labelled on the left;
    the settings, prompts and seeds ride in the PNG's text chunks."""
    count = min(GRID_SAMPLES, len(cases))
    blocks = [
        (f"cfg {scale:g}", make_grid((images[:count] + 1) / 2, nrow=GRID_COLUMNS, padding=2, pad_value=1.0))
        for scale, images in images_by_scale.items()
    ]
    block_height, block_width = blocks[0][1].shape[1:]
    canvas = Image.new("RGB", (LABEL_WIDTH + block_width, block_height * len(blocks)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, block) in enumerate(blocks):
        canvas.paste(to_pil(block), (LABEL_WIDTH, i * block_height))
        draw.text((4, i * block_height + block_height // 2 - 6), label, fill="black")
    metadata = {**settings, "prompts": [case.prompt for case in cases[:count]], "seeds": [case.seed for case in cases[:count]]}
    canvas.save(path, pnginfo=png_info(metadata))


def evaluate_generation(
    ckpt: str | os.PathLike,
    *,
    n: int = 256,
    guidance_scales: Sequence[float] = (1.0, 5.0),
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    steps: int = 25,
    sampler_name: str = "ddim",
    batch_size: int = 64,
    seed: int = 0,
    holdout_fraction: float = 0.25,
    size: int | None = None,
    device: str = "auto",
    grid: str | Path | None = None,
    progress: bool = True,
    use_ema: bool = True,
) -> dict[str, Any]:
    """Samples ``n`` drawn captions at every guidance scale (same seeds) and scores them; every number
    as one JSON-ready dict (``generation_report`` prints it).

    ``size`` defaults to the autoencoder's training resolution, the size the shapes were learned at.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    torch_device = pick_device(device)
    model = load_for_evaluation(ckpt, torch_device, use_ema=use_ema)
    size = size or model.image_size
    sampler = build_sampler(sampler_name, model.schedule, steps)
    cases = draw_cases(n, seed, holdout_fraction)

    per_scale: dict[str, Any] = {}
    images_by_scale: dict[float, Tensor] = {}
    bar = tqdm(total=n * len(guidance_scales), desc="images", unit="img", disable=not progress)
    for scale in guidance_scales:
        bar.set_postfix(guidance=f"{scale:g}")
        _synchronize(torch_device)
        started = time.perf_counter()
        images = sample_cases(model, sampler, cases, float(scale), size, batch_size, bar, guidance_rescale, guidance_interval)
        _synchronize(torch_device)
        seconds = time.perf_counter() - started
        accuracies = subset_scores(images, cases)
        per_scale[f"{float(scale):g}"] = {
            **accuracies,
            "overall_half_width": {name: binomial_half_width(acc, n) for name, acc in accuracies["overall"].items()},
            "sampling_seconds": seconds,
        }
        images_by_scale[float(scale)] = images
    bar.close()

    result = {
        "mode": "generate",
        "checkpoint": str(ckpt),
        "training_steps": training_steps(ckpt),
        "sampler": sampler_name,
        "spacing": sampler.spacing,
        "steps": steps,
        "guidance_rescale": guidance_rescale,
        "guidance_interval": list(guidance_interval) if guidance_interval else None,
        "weights": "ema" if use_ema else "raw",
        "size": size,
        "n": n,
        "n_seen": sum(not case.held_out for case in cases),
        "n_held_out": sum(case.held_out for case in cases),
        "held_out_pairs": [list(pair) for pair in DEFAULT_HOLDOUT],
        "seed": seed,
        "device": str(torch_device),
        "chance": dict(CHANCE),
        "guidance": per_scale,
        "sampling_seconds": sum(entry["sampling_seconds"] for entry in per_scale.values()),
    }
    if grid:
        settings = {key: result[key] for key in ("checkpoint", "training_steps", "sampler", "steps", "size", "seed")}
        save_grid(grid, images_by_scale, cases, settings | {"guidance_scales": [float(s) for s in guidance_scales]})
        result["grid"] = str(grid)
    return result


@torch.no_grad()
def evaluate_detector(
    autoencoder_ckpt: str | os.PathLike,
    *,
    n: int = 512,
    size: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Detector accuracies on ``n`` clean val-split shapes and on their reconstructions, and the
    reconstruction PSNR (over the whole set's squared error in [0, 1], as in stage-1 validation).
    ``trusted``: the detector reads every attribute of at least 95% of the reconstructions."""
    torch_device = pick_device(device)
    autoencoder = load_autoencoder(autoencoder_ckpt).eval().to(torch_device)
    dataset = ShapesDataset(size=size, length=n, split="val", seed=seed, cache=False)
    clean = torch.stack([dataset[i]["image"] for i in range(n)])
    reconstructions = []
    for start in range(0, n, batch_size):
        batch = clean[start : start + batch_size].to(torch_device)
        reconstructions.append(autoencoder.decode(autoencoder.encode(batch).mode()).float().clamp(-1, 1).cpu())
    reconstructed = torch.cat(reconstructions)
    squared_error = (((reconstructed + 1) / 2 - (clean + 1) / 2) ** 2).mean().item()
    attributes = [dataset.attributes(i) for i in range(n)]
    result = {
        "mode": "detector",
        "autoencoder_checkpoint": str(autoencoder_ckpt),
        "training_steps": training_steps(autoencoder_ckpt),
        "n": n,
        "size": size,
        "seed": seed,
        "clean": score(clean, attributes),
        "reconstruction": score(reconstructed, attributes),
        "psnr": 10.0 * math.log10(1.0 / max(squared_error, 1e-12)),
    }
    result["trusted"] = all(result["reconstruction"][name] >= TRUSTED_ACCURACY for name in ATTRIBUTES)
    return result


def _percent(value: float) -> str:
    return f"{100 * value:5.1f}"


def format_table(rows: Sequence[tuple[str, dict[str, float] | None, dict[str, float] | None]], label_header: str) -> str:
    """Rows of (label, accuracies, half-widths or None) as a fixed-width table in percent."""
    label_width = max(len(label_header), *(len(label) for label, _, _ in rows))
    lines = [f"{label_header:<{label_width}}  " + "  ".join(f"{name:>11}" for name in COLUMNS)]
    for label, accuracies, half_widths in rows:
        if accuracies is None:
            cells = ["-".rjust(11) for _ in COLUMNS]
        else:
            cells = [
                (f"{_percent(accuracies[name])}±{100 * half_widths[name]:4.1f}" if half_widths else _percent(accuracies[name])).rjust(11)
                for name in COLUMNS
            ]
        lines.append(f"{label:<{label_width}}  " + "  ".join(cells))
    return "\n".join(lines)


def generation_report(result: dict[str, Any]) -> str:
    """`evaluate_generation`'s result as text: settings, the guidance x attribute table, wall times."""
    rows = []
    for scale, entry in result["guidance"].items():
        rows += [
            (f"cfg {scale} seen (n={result['n_seen']})", entry["seen"], None),
            (f"cfg {scale} held-out (n={result['n_held_out']})", entry["held_out"], None),
            (f"cfg {scale} overall (n={result['n']})", entry["overall"], entry["overall_half_width"]),
        ]
    rows.append(("chance", result["chance"], None))
    timings = ", ".join(f"cfg {scale}: {entry['sampling_seconds']:.1f} s" for scale, entry in result["guidance"].items())
    interval = result["guidance_interval"]
    guided_steps = f"t in [{interval[0]:g}, {interval[1]:g}]" if interval else "all steps"
    return "\n".join(
        [
            f"checkpoint {result['checkpoint']} ({result['training_steps']} training steps, {result['weights']} weights)",
            (
                f"{result['sampler']} {result['steps']} steps ({result['spacing']}), guidance rescale {result['guidance_rescale']:g}, "
                f"guidance interval {guided_steps}, {result['size']}x{result['size']}, "
                f"seeds {result['seed']}..{result['seed'] + result['n'] - 1}, "
                f"held-out pairs {', '.join(' '.join(pair) for pair in result['held_out_pairs'])}"
            ),
            "accuracy in % (overall: ± binomial 95% half-width)",
            format_table(rows, "guidance / prompts"),
            f"sampling wall time on {result['device']}: {result['sampling_seconds']:.1f} s ({timings})",
        ]
    )


def detector_report(result: dict[str, Any]) -> str:
    """`evaluate_detector`'s result as text, ending in whether the detector can be trusted."""
    rows = [(f"clean (n={result['n']})", result["clean"], None), (f"reconstructed (n={result['n']})", result["reconstruction"], None)]
    verdict = "yes" if result["trusted"] else "NO"
    return "\n".join(
        [
            f"autoencoder {result['autoencoder_checkpoint']} ({result['training_steps']} training steps), {result['size']}x{result['size']} val shapes",
            "detector accuracy in %",
            format_table(rows, "images"),
            f"reconstruction PSNR: {result['psnr']:.2f} dB",
            f"every attribute >= {100 * TRUSTED_ACCURACY:.0f}% on reconstructions: {verdict}",
        ]
    )


__all__ = [
    "CHANCE",
    "COLUMNS",
    "TRUSTED_ACCURACY",
    "PromptCase",
    "binomial_half_width",
    "detector_report",
    "draw_cases",
    "evaluate_detector",
    "evaluate_generation",
    "format_table",
    "generation_report",
    "load_for_evaluation",
    "sample_cases",
    "save_grid",
    "subset_scores",
    "training_steps",
]
