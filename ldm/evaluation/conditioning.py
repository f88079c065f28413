"""The shapes measurements of the non-text conditionings (docs/conditioning.md), one per kind of model:

- class: the shapes detector reads the asked (colour, shape) class in each sample;
- none: the detected colours, shapes and backgrounds are distributed as in the data (total variation,
  beside what a perfect model would score with as many samples);
- inpaint: a shape's grid cell is regenerated with another colour asked; the kept region's PSNR against
  the input (beside the autoencoder's own reconstruction PSNR of that region) and the detected colour;
- superres: PSNR of the upsampled held-out images against the originals, beside bicubic upsampling.

Each samples with a fixed seed per image, on held-out ("val") shapes where it needs images, and returns
its figures and, under "grid", a picture of them (`GRID_COLUMNS` wide, in [-1, 1]) for the eye.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.data.shapes import CLASSES, SHAPE_COLOURS, ShapesDataset, caption_from_attributes, position_centre
from ldm.diffusion import build_sampler
from ldm.evaluation.shapes_detector import detect_batch
from ldm.inference import LatentDiffusionModel, generate_images

TV_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "background")
GRID_COLUMNS = 8
GUIDANCE = ("guidance_scale", "guidance_interval")  # options of the guided kinds (class, inpaint)


def _grid_rows(*rows: Tensor) -> Tensor:
    """Rows of GRID_COLUMNS images each (a short row padded with white), stacked in order, as make_grid lays
    them out with nrow=GRID_COLUMNS."""
    padded = []
    for row in rows:
        row = row[:GRID_COLUMNS].cpu().float()
        padded += [row, torch.ones(GRID_COLUMNS - len(row), *row.shape[1:])]
    return torch.cat(padded)


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _generate(model: LatentDiffusionModel, n: int, batch_size: int, make: Callable[[range], dict[str, Any]], *, steps: int,
              sampler: str, seed: int, **options: Any) -> Tensor:
    """n images, image k from seed + k, each batch's inputs from `make(indices)`."""
    chosen = build_sampler(sampler, model.schedule, steps)
    size = model.image_size
    out = []
    for indices in _batches(n, batch_size):
        inputs = {"height": size, "width": size, **make(indices)}
        out.append(generate_images(model, chosen, inputs.pop("prompts", None), [seed + k for k in indices], **inputs, **options).cpu())
    return torch.cat(out)


def class_accuracy(model: LatentDiffusionModel, per_class: int = 32, *, guidance_scale: float = 5.0, steps: int = 25,
                   sampler: str = "ddim", seed: int = 0, batch_size: int = 64,
                   guidance_interval: tuple[float, float] | None = None) -> dict[str, Any]:
    """Share of samples of each class in which the detector reads the class's colour, shape, and both."""
    labels = [label for label in range(len(CLASSES)) for _ in range(per_class)]
    images = _generate(model, len(labels), batch_size, lambda idx: {"class_labels": [labels[k] for k in idx]},
                       steps=steps, sampler=sampler, seed=seed, guidance_scale=guidance_scale, guidance_interval=guidance_interval)
    found = detect_batch(images)
    colour = [d["colour"] == CLASSES[label][0] for d, label in zip(found, labels)]
    shape = [d["shape"] == CLASSES[label][1] for d, label in zip(found, labels)]
    both = [c and s for c, s in zip(colour, shape)]
    per_label = {f"{c} {s}": sum(both[k] for k in range(len(labels)) if labels[k] == i) / per_class for i, (c, s) in enumerate(CLASSES)}
    return {"task": "class", "n": len(labels), "guidance_scale": guidance_scale,
            "guidance_interval": list(guidance_interval) if guidance_interval else None, "steps": steps, "sampler": sampler,
            "accuracy": sum(both) / len(both), "colour": sum(colour) / len(colour), "shape": sum(shape) / len(shape),
            "per_class": per_label, "grid": _grid_rows(*images.split(per_class))}  # a row per class


def distribution(readings: Sequence[dict[str, str]], attribute: str) -> dict[str, float]:
    counts = Counter(reading[attribute] for reading in readings)
    return {name: count / len(readings) for name, count in sorted(counts.items())}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def sampling_floor(p: dict[str, float], n: int, draws: int = 2000, seed: int = 0) -> float:
    """The mean total variation between `p` and the share of each value in n draws from `p` itself: what
    a perfect model scores with n samples (e.g. 0.032 for 8 near-uniform colours at n = 1024, 0.016 at 4096)."""
    rng = np.random.default_rng(seed)
    probabilities = np.array(list(p.values()))
    shares = rng.multinomial(n, probabilities / probabilities.sum(), size=draws) / n
    return float(0.5 * np.abs(shares - probabilities).sum(axis=1).mean())


def unconditional_match(model: LatentDiffusionModel, n: int = 4096, *, steps: int = 25, sampler: str = "ddim", seed: int = 0,
                        batch_size: int = 64, data_seed: int = 0, reference_n: int = 16384) -> dict[str, Any]:
    """Total variation distance between the detected colour / shape / background distributions of n samples
    and the training data's (the true attributes of its first `reference_n` images, which the detector reads
    without error on real images), beside `sampling_floor`: what a perfect model would score with n samples."""
    images = _generate(model, n, batch_size, lambda idx: {}, steps=steps, sampler=sampler, seed=seed)
    data = ShapesDataset(size=model.image_size, length=reference_n, split="train", seed=data_seed, cache=False)
    reference = [data.attributes(i) for i in range(reference_n)]
    generated = detect_batch(images)
    result: dict[str, Any] = {"task": "none", "n": n, "reference_n": reference_n, "steps": steps, "sampler": sampler}
    for attribute in TV_ATTRIBUTES:
        p, q = distribution(generated, attribute), distribution(reference, attribute)
        result[attribute] = {"tv": total_variation(p, q), "floor": sampling_floor(q, n), "samples": p, "data": q}
    result["max_tv"] = max(result[a]["tv"] for a in TV_ATTRIBUTES)
    result["max_floor"] = max(result[a]["floor"] for a in TV_ATTRIBUTES)
    result["grid"] = _grid_rows(*images[: GRID_COLUMNS * GRID_COLUMNS].split(GRID_COLUMNS))
    return result


def cell_mask(position: str, size: int) -> Tensor:
    """1 x 1 x size x size: the grid cell a shape at `position` stays inside (1 = regenerate)."""
    centre_x, centre_y = position_centre(position)
    mask = torch.zeros(1, 1, size, size)
    left, top = round((centre_x - 1 / 6) * size), round((centre_y - 1 / 6) * size)
    right, bottom = round((centre_x + 1 / 6) * size), round((centre_y + 1 / 6) * size)
    mask[..., top:bottom, left:right] = 1.0
    return mask


def masked_psnr(images: Tensor, originals: Tensor, keep: Tensor) -> Tensor:
    """PSNR (dB, images in [-1, 1] taken to [0, 1]) of each image over the pixels where `keep` is 1."""
    error = (((images.float() - originals.float()) / 2) ** 2 * keep).sum(dim=(1, 2, 3)) / (keep.sum(dim=(1, 2, 3)) * images.shape[1])
    return 10 * torch.log10(1.0 / error.clamp_min(1e-10))


def inpainting_scores(model: LatentDiffusionModel, n: int = 256, *, guidance_scale: float = 5.0, steps: int = 25,
                      sampler: str = "ddim", seed: int = 0, batch_size: int = 64, data_seed: int = 0,
                      guidance_interval: tuple[float, float] | None = None) -> dict[str, Any]:
    """Held-out shapes with their shape's grid cell masked and the caption asking another colour: the PSNR
    of the kept region against the input (and of the autoencoder's reconstruction there, the ceiling), and
    how often the detector reads the asked colour."""
    data = ShapesDataset(size=model.image_size, length=n, split="val", seed=data_seed, cache=False)
    originals = torch.stack([data[i]["image"] for i in range(n)])
    prompts, asked, masks = [], [], []
    for i in range(n):
        attributes = data.attributes(i)
        others = [c for c in SHAPE_COLOURS if c not in (attributes["colour"], attributes["background"])]
        asked.append(others[(seed + i) % len(others)])
        prompts.append(caption_from_attributes({**attributes, "colour": asked[-1]}))
        masks.append(cell_mask(attributes["position"], model.image_size))
    masks = torch.cat(masks)
    device = model.device
    images = _generate(model, n, batch_size, lambda idx: {"prompts": prompts[idx.start:idx.stop], "init_image": originals[idx.start:idx.stop].to(device),
                                                          "mask": masks[idx.start:idx.stop].to(device)},
                       steps=steps, sampler=sampler, seed=seed, guidance_scale=guidance_scale, guidance_interval=guidance_interval)
    reconstructions = torch.cat([model.codec.decode(model.codec.encode(originals[idx.start:idx.stop].to(device), sample=False)).cpu()
                                 for idx in _batches(n, batch_size)])
    keep = 1.0 - masks
    psnr, ae_psnr = masked_psnr(images, originals, keep).mean().item(), masked_psnr(reconstructions, originals, keep).mean().item()
    colour = [reading["colour"] == wanted for reading, wanted in zip(detect_batch(images), asked)]
    shown = [part[start:] for start in range(0, min(n, 2 * GRID_COLUMNS), GRID_COLUMNS) for part in (originals, originals * keep, images)]
    return {"task": "inpaint", "n": n, "guidance_scale": guidance_scale,
            "guidance_interval": list(guidance_interval) if guidance_interval else None, "steps": steps, "sampler": sampler,
            "kept_psnr": psnr, "autoencoder_kept_psnr": ae_psnr, "kept_psnr_margin": psnr - ae_psnr,
            "asked_colour": sum(colour) / n, "grid": _grid_rows(*shown)}  # input, masked (grey: regenerated), output


def superres_scores(model: LatentDiffusionModel, n: int = 256, *, steps: int = 25, sampler: str = "ddim", seed: int = 0,
                    batch_size: int = 64, data_seed: int = 0) -> dict[str, Any]:
    """Mean PSNR of the model's upsampling of held-out shapes (bicubic-downsampled by its factor) and of
    bicubic upsampling, against the originals."""
    conditioner = model.conditioner
    data = ShapesDataset(size=model.image_size, length=n, split="val", seed=data_seed, cache=False)
    originals = torch.stack([data[i]["image"] for i in range(n)])
    low = conditioner.low_resolution(originals)
    images = _generate(model, n, batch_size, lambda idx: {"init_image": low[idx.start:idx.stop].to(model.device)},
                       steps=steps, sampler=sampler, seed=seed)
    bicubic = F.interpolate(low, size=originals.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    everything = torch.ones_like(originals[:, :1])
    ours, baseline = masked_psnr(images, originals, everything).mean().item(), masked_psnr(bicubic, originals, everything).mean().item()
    nearest = F.interpolate(low, size=originals.shape[-2:], mode="nearest")
    return {"task": "superres", "n": n, "factor": conditioner.factor, "steps": steps, "sampler": sampler,
            "psnr": ours, "bicubic_psnr": baseline, "gain_db": ours - baseline,
            "grid": _grid_rows(nearest, bicubic, images, originals)}  # input (nearest), bicubic, model, original


def evaluate(model: LatentDiffusionModel, n: int, **options: Any) -> dict[str, Any]:
    """The measurement of this model's kind; `n` is samples per class for a class-conditional model, else images."""
    kind = model.conditioner.kind
    if kind == "class":
        return class_accuracy(model, n, **options)
    if kind == "none":
        return unconditional_match(model, n, **{k: v for k, v in options.items() if k not in GUIDANCE})
    if kind == "inpaint":
        return inpainting_scores(model, n, **options)
    if kind == "superres":
        return superres_scores(model, n, **{k: v for k, v in options.items() if k not in GUIDANCE})
    raise ValueError(f"a {kind} model is measured by benchmarks/prompt_following.py, not here")
