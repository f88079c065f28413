"""What `python evaluate.py` does: the field's numbers for a checkpoint of either stage.

Stage 1 (a checkpoint of `python train.py stage=autoencoder`): the first ``n_images`` of the data's
held-out split go through the autoencoder (posterior mean, then decode); PSNR, SSIM and LPIPS of each
reconstruction against its original (mean and std over images), and rFID, the FID between the
originals and the reconstructions.

Stage 2 (`stage=ldm`): ``n_images`` images generated for a prompt set (the captions of the same
held-out images, or one prompt a line of ``prompts_file``, cycled), for their class labels (a
class-conditional model) or for nothing (an unconditional one), image k from seed ``seed + k``,
with the `sampler` config group's sampler and the given guidance, through `ldm.inference`; FID, KID, IS
and precision/recall against the held-out images (the reference set).

The reference set's Inception features are cached on disk (`ldm.evaluation.metrics.FeatureCache`).
Results go to ``out_dir``: ``metrics.json`` (every number and the settings that produced it),
``metrics.md`` (a Markdown table) and a grid PNG. `reconstruction_metrics` and `generation_metrics_of`
are what the training callback (`ldm.training.evaluation_callback`) calls too. Nothing here imports
Lightning.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ldm.checkpoints import autoencoder_from_checkpoint, checkpoint_stage, read_checkpoint
from ldm.errors import CheckpointStageError, EvaluationError, SamplingInputError
from ldm.evaluation import metrics as M
from ldm.evaluation.inception import InceptionFeatureExtractor, load_inception
from ldm.inference import LatentDiffusionModel, generate_images
from ldm.inference.images import save_png
from ldm.inference.sample import SAMPLER_SHORTCUTS, checked_setting, load_checkpoint_for_sampling, pick_device, sampler_from_config
from ldm.diffusion.guidance import checked_interval, checked_rescale, checked_scale

log = logging.getLogger(__name__)

GRID_IMAGES = 64


# --------------------------------------------------------------------------------------------------
# The measurements, over modules already built (used by evaluate() and the training callback).


@torch.no_grad()
def reconstruct(autoencoder: nn.Module, images: Tensor) -> Tensor:
    """The autoencoder's reconstruction (posterior mean, decoded) of images in [-1, 1], clamped to [-1, 1]."""
    device = next(autoencoder.parameters()).device
    x = images.to(device)
    return autoencoder.decode(autoencoder.encode(x).mode()).float().clamp(-1, 1).cpu()


@torch.no_grad()
def reconstruction_metrics(
    autoencoder: nn.Module,
    batches: Iterable[Tensor],
    extractor: InceptionFeatureExtractor | None,
    lpips: nn.Module | None,
    metrics: Sequence[str] = M.RECONSTRUCTION_METRICS,
    reference: M.Features | None = None,
    progress: bool = False,
    total: int | None = None,
    keep: int = 0,
) -> tuple[dict[str, Any], Tensor | None]:
    """PSNR/SSIM/LPIPS (mean and std over images) and rFID of the reconstructions of ``batches`` (images in
    [-1, 1]). ``reference``: the originals' features, when already known (else computed here). Returns the
    numbers and the first ``keep`` (original, reconstruction) pairs interleaved, for a grid."""
    unknown = sorted(set(metrics) - set(M.RECONSTRUCTION_METRICS))
    if unknown:
        raise EvaluationError(f"unknown reconstruction metric(s) {unknown}; choose from {list(M.RECONSTRUCTION_METRICS)}")
    per_image: dict[str, list[Tensor]] = {name: [] for name in ("psnr", "ssim", "lpips") if name in metrics}
    if "lpips" in per_image and lpips is None:
        del per_image["lpips"]
    originals_f, reconstructions_f, kept = [], [], []
    bar = tqdm(total=total, desc="reconstructions", unit="img", disable=not progress)
    for images in batches:
        reconstructions = reconstruct(autoencoder, images)
        if "psnr" in per_image:
            per_image["psnr"].append(M.psnr_per_image(reconstructions, images))
        if "ssim" in per_image:
            per_image["ssim"].append(M.ssim_per_image(reconstructions, images))
        if "lpips" in per_image:
            per_image["lpips"].append(M.lpips_per_image(lpips, reconstructions, images))
        if "rfid" in metrics:
            reconstructions_f.append(M.features_of(extractor, reconstructions).pool)
            if reference is None:
                originals_f.append(M.features_of(extractor, images).pool)
        if sum(len(k) for k in kept) < 2 * keep:
            kept.append(torch.stack([images.cpu().float(), reconstructions], dim=1).flatten(0, 1))
        bar.update(len(images))
    bar.close()
    out: dict[str, Any] = {}
    for name, values in per_image.items():
        out[name], out[f"{name}_std"] = M.summarize(torch.cat(values))
    if "rfid" in metrics:
        real = reference.pool if reference is not None else torch.cat(originals_f)
        out["rfid"] = M.fid(real, torch.cat(reconstructions_f))
    pairs = torch.cat(kept)[: 2 * keep] if kept else None
    return out, pairs


@torch.no_grad()
def generate(
    model: LatentDiffusionModel,
    sampler: Any,
    prompts: Sequence[str] | None,
    seeds: Sequence[int],
    size: tuple[int, int],
    batch_size: int = 16,
    progress: bool = False,
    class_labels: Sequence[int] | None = None,
    **guidance: Any,
) -> Iterator[Tensor]:
    """Images in [-1, 1] (on the CPU) for each seed (and its prompt or class label, whichever the model
    takes: `generation_inputs`), a batch at a time, with a progress bar."""
    bar = tqdm(total=len(seeds), desc="generating", unit="img", disable=not progress)
    for start in range(0, len(seeds), batch_size):
        part = slice(start, start + batch_size)
        images = generate_images(model, sampler, list(prompts[part]) if prompts is not None else None, list(seeds[part]),
                                 height=size[0], width=size[1], class_labels=list(class_labels[part]) if class_labels is not None else None,
                                 **guidance).float().clamp(-1, 1).cpu()
        bar.update(len(images))
        yield images
    bar.close()


def generation_inputs(model: LatentDiffusionModel, captions: Sequence[str], labels: Sequence[int] | None) -> dict[str, list | None]:
    """What the model generates each reference image's counterpart from: its caption (text-to-image), its
    class label (class-conditional: class-conditional FID, as for ImageNet LDMs), or nothing (unconditional)."""
    conditioner = model.conditioner
    if conditioner.consumes_image:
        raise EvaluationError(f"this is a {conditioner.description} model: it generates from input images, not for a reference "
                              f"set; measure it with benchmarks/conditioning_eval.py (docs/conditioning.md).")
    if "class_label" in conditioner.required:
        if labels is None:
            raise EvaluationError("this is a class-conditional model and the reference images have no labels (batch['label']); "
                                  "evaluate it on labelled data (data=shapes, data=emoji).")
        return {"prompts": None, "class_labels": [int(label) for label in labels]}
    if "prompt" in conditioner.inputs:
        return {"prompts": list(captions), "class_labels": None}
    return {"prompts": None, "class_labels": None}


def generation_metrics_of(
    image_batches: Iterable[Tensor],
    extractor: InceptionFeatureExtractor,
    reference: M.Features,
    metrics: Sequence[str] = M.GENERATION_METRICS,
    keep: int = 0,
    **options: Any,
) -> tuple[dict[str, Any], Tensor | None]:
    """FID/KID/IS/precision/recall of generated image batches against the reference set's features."""
    parts, kept = [], []
    for images in image_batches:
        parts.append(M.features_of(extractor, images))
        if sum(len(k) for k in kept) < keep:
            kept.append(images)
    fake = M.Features.cat(parts)
    try:
        out = M.generation_metrics(reference.pool, fake.pool, fake.logits, metrics, **options)
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    return out, (torch.cat(kept)[:keep] if kept else None)


# --------------------------------------------------------------------------------------------------
# evaluate.py


def _resolution_of(ckpt: dict[str, Any], stage: str) -> int:
    hparams = ckpt.get("hyper_parameters") or {}
    model = hparams.get("model" if stage == "autoencoder" else "autoencoder") or {}
    return int(model.get("resolution", 64))


def build_reference_dataset(cfg: DictConfig) -> tuple[Dataset, dict[str, Any]]:
    """The held-out dataset: ``cfg.data[cfg.split]``, and its resolved config (what its features are keyed by)."""
    data = cfg.data
    node = data.get(cfg.split) if isinstance(data, DictConfig) else None
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise EvaluationError(f"data has no '{cfg.split}' dataset: evaluate.py reads the map-style datasets of the data group "
                              "(data=shapes, data=emoji, data=folder) and split=val or split=train.")
    description = OmegaConf.to_container(node, resolve=True)
    try:
        dataset = hydra.utils.instantiate(node)
    except Exception as err:  # instantiate wraps the dataset's own ValueError/FileNotFoundError
        cause = err.__cause__ or err
        raise EvaluationError(f"data.{cfg.split}: {cause}") from None
    return dataset, description


def first_images(dataset: Dataset, n: int, batch_size: int) -> Callable[[], Iterator[Tensor]]:
    """A re-iterable of the first ``n`` images of ``dataset``, in batches, always in the same order."""

    def batches() -> Iterator[Tensor]:
        loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False, num_workers=0)
        for batch in loader:
            yield batch["image"]

    return batches


def captions_of(dataset: Dataset, n: int) -> list[str]:
    if hasattr(dataset, "caption"):
        return [dataset.caption(i) for i in range(n)]
    return [dataset[i]["caption"] for i in range(n)]


def labels_of(dataset: Dataset, n: int) -> list[int] | None:
    """The first n images' class labels, or None where the dataset gives none."""
    reader = getattr(dataset, "label_of", None) or (dataset.label if callable(getattr(dataset, "label", None)) else None)
    if reader is not None:
        return [int(reader(i)) for i in range(n)]
    if n == 0 or "label" not in dataset[0]:
        return None
    return [int(dataset[i]["label"]) for i in range(n)]


def read_prompt_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise EvaluationError(f"prompts_file={path} does not exist.")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise EvaluationError(f"prompts_file={path} has no prompts (one prompt a line).")
    return prompts


def _metric_names(cfg: DictConfig, stage: str) -> list[str]:
    allowed = M.RECONSTRUCTION_METRICS if stage == "autoencoder" else M.GENERATION_METRICS
    names = list(cfg.metrics.names) if cfg.metrics.names else list(allowed)
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise EvaluationError(f"metrics.names: {unknown} do not apply to a {stage} checkpoint; choose from {list(allowed)}.")
    return names


def _check(cfg: DictConfig) -> None:
    if not cfg.ckpt:
        raise EvaluationError("Give the checkpoint to evaluate: ckpt=runs/<stage>/<run>/checkpoints/last.ckpt")
    if not Path(cfg.ckpt).is_file():
        raise EvaluationError(f"ckpt={cfg.ckpt} does not exist.")
    if cfg.n_images < 2 or cfg.batch_size < 1:
        raise EvaluationError(f"n_images ({cfg.n_images}) must be at least 2 and batch_size ({cfg.batch_size}) at least 1.")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Runs evaluate.yaml's settings; returns what it writes to ``out_dir/metrics.json``."""
    _check(cfg)
    started, cpu_started = time.perf_counter(), time.process_time()
    ckpt = read_checkpoint(cfg.ckpt)
    stage = checkpoint_stage(ckpt)
    if stage not in ("autoencoder", "ldm"):
        raise CheckpointStageError(f"{cfg.ckpt} is not a checkpoint written by ldm's train.py (stage=autoencoder or stage=ldm).")
    names = _metric_names(cfg, stage)
    device = pick_device(cfg.device)
    resolution = int(cfg.image_size or _resolution_of(ckpt, stage))
    with open_dict(cfg):
        cfg.image_size = resolution
    dataset, data_description = build_reference_dataset(cfg)
    n_images = int(cfg.n_images)
    if len(dataset) < n_images:
        log.warning("data.%s has %d images: evaluating %d, not n_images=%d", cfg.split, len(dataset), len(dataset), n_images)
        n_images = len(dataset)
    needs_inception = stage == "ldm" or "rfid" in names
    extractor = load_inception(cfg.metrics.inception_weights, device) if needs_inception else None
    cache = M.FeatureCache(cfg.metrics.feature_cache)
    batches = first_images(dataset, n_images, int(cfg.batch_size))
    reference, cached = None, False
    if extractor is not None:
        key = M.cache_key(data_description, n_images, resolution, extractor)
        reference, cached = M.reference_features(extractor, batches, n_images, cache, key,
                                                 {"data": data_description, "n": n_images, "resolution": resolution},
                                                 progress=bool(cfg.progress))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "stage": stage,
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "global_step": ckpt.get("global_step"),
        "data": data_description,
        "split": cfg.split,
        "n_images": n_images,
        "image_size": resolution,
    }
    if extractor is not None:
        result["inception"] = {"weights": str(extractor.weights.path), "kind": extractor.weights.kind, "sha256": extractor.weights.sha256,
                               "reference_features_cached": cached}
    if stage == "autoencoder":
        autoencoder, _ = autoencoder_from_checkpoint(ckpt, cfg.ckpt)
        del ckpt
        autoencoder = autoencoder.eval().requires_grad_(False).to(device)
        lpips, lpips_name = M.load_lpips(cfg.metrics.lpips) if "lpips" in names else (None, "none")
        if lpips is not None:
            lpips = lpips.to(device)
            result["lpips_network"] = lpips_name
        numbers, pairs = reconstruction_metrics(autoencoder, batches(), extractor, lpips, names, reference,
                                                progress=bool(cfg.progress), total=n_images, keep=GRID_IMAGES // 2)
        grid_name, grid = "reconstructions.png", pairs
    else:
        del ckpt
        numbers, grid, settings = _evaluate_generation(cfg, dataset, n_images, extractor, reference, names, device, resolution)
        result.update(settings)
        grid_name = "samples.png"
    result["metrics"] = numbers
    result["timing"] = {"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu_started, 1),
                        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                        "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if grid is not None:
        save_png(make_grid((grid + 1) / 2, nrow=8, padding=2, pad_value=1.0), out_dir / grid_name, {"evaluation": stage})
        result["grid"] = str(out_dir / grid_name)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / "metrics.md").write_text(markdown_table(result), encoding="utf-8")
    log.info("%s", markdown_table(result))
    log.info("Wrote metrics.json, metrics.md and %s to %s", grid_name, out_dir)
    return result


def _evaluate_generation(cfg: DictConfig, dataset: Dataset, n_images: int, extractor: InceptionFeatureExtractor, reference: M.Features,
                         names: list[str], device: torch.device, resolution: int) -> tuple[dict[str, Any], Tensor | None, dict[str, Any]]:
    guidance_scale = checked_setting(cfg, "guidance_scale", checked_scale)
    guidance_rescale = float(checked_setting(cfg, "guidance_rescale", checked_rescale))
    interval = checked_setting(cfg, "guidance_interval", checked_interval)
    model = load_checkpoint_for_sampling(cfg.ckpt, device, bool(cfg.use_ema))
    sampler, sampler_options = sampler_from_config(cfg.sampler, model.schedule, {k: cfg.get(k) for k in SAMPLER_SHORTCUTS})
    if cfg.prompts_file and "prompt" not in model.conditioner.inputs:
        description = model.conditioner.description
        raise EvaluationError(f"prompts_file= is for text-to-image models; this is {'an' if description[0] in 'aeiou' else 'a'} {description} model: "
                              f"leave prompts_file out.")
    source = read_prompt_file(cfg.prompts_file) if cfg.prompts_file else captions_of(dataset, n_images)
    prompts = [source[k % len(source)] for k in range(n_images)]
    inputs = generation_inputs(model, prompts, labels_of(dataset, n_images) if "class_label" in model.conditioner.inputs else None)
    seeds = [int(cfg.seed) + k for k in range(n_images)]
    try:
        batches = generate(model, sampler, inputs["prompts"], seeds, (resolution, resolution), int(cfg.batch_size), bool(cfg.progress),
                           class_labels=inputs["class_labels"],
                           guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, guidance_interval=interval,
                           negative_prompt=cfg.negative_prompt)
        numbers, grid = generation_metrics_of(batches, extractor, reference, names, keep=GRID_IMAGES,
                                              kid_subsets=int(cfg.metrics.kid_subsets), kid_subset_size=int(cfg.metrics.kid_subset_size),
                                              is_splits=int(cfg.metrics.is_splits), pr_k=int(cfg.metrics.pr_k), seed=int(cfg.seed))
    except EvaluationError:
        raise
    except ValueError as err:  # sizes the networks cannot take, sampler options out of range
        raise SamplingInputError(str(err)) from err
    settings = {
        "sampler": sampler.name, "steps": sampler.steps, "sampler_options": sampler_options, "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale, "guidance_interval": list(interval) if interval else None,
        "negative_prompt": cfg.negative_prompt, "use_ema": bool(cfg.use_ema), "seeds": [seeds[0], seeds[-1]],
        "prompts": (str(cfg.prompts_file) if cfg.prompts_file else f"captions of data.{cfg.split}") if inputs["prompts"] is not None else None,
        "class_labels": f"labels of data.{cfg.split}" if inputs["class_labels"] is not None else None,
        "conditioning": model.conditioner.kind,
    }
    return numbers, grid, settings


# --------------------------------------------------------------------------------------------------
# Reporting.

_COLUMNS = {
    "autoencoder": [("PSNR (dB)", "psnr"), ("SSIM", "ssim"), ("LPIPS", "lpips"), ("rFID", "rfid")],
    "ldm": [("FID", "fid"), ("KID", "kid"), ("IS", "is"), ("Precision", "precision"), ("Recall", "recall")],
}


def _format(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "n/a" if key in metrics else "-"
    digits = {"psnr": 2, "rfid": 2, "fid": 2, "is": 2, "kid": 4}.get(key, 3)
    text = f"{value:.{digits}f}"
    std = metrics.get(f"{key}_std")
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def markdown_table(result: dict[str, Any]) -> str:
    """One row: the checkpoint's metrics, with the settings that produced them."""
    stage = result["stage"]
    columns = _COLUMNS[stage]
    header = ["checkpoint", "step", "data", "images"] + [name for name, _ in columns]
    data = result["data"].get("_target_", "?").rsplit(".", 1)[-1] if isinstance(result.get("data"), dict) else "?"
    row = [Path(result["checkpoint"]).name, str(result.get("global_step")), f"{data} {result['split']} {result['image_size']}px",
           str(result["n_images"])] + [_format(result["metrics"], key) for _, key in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |", ""]
    if stage == "ldm":
        inputs = (f"prompts: {result['prompts']}" if result.get("prompts") else
                  f"class labels: {result['class_labels']}" if result.get("class_labels") else "unconditional")
        lines.append(f"Sampler {result['sampler']} ({result['steps']} steps), guidance {result['guidance_scale']}, {inputs}.")
    if result.get("lpips_network"):
        lines.append(f"LPIPS network: {result['lpips_network']}.")
    for note in result["metrics"].get("notes", []):
        lines.append(f"Note: {note}.")
    timing = result.get("timing", {})
    if timing:
        lines.append(f"Wall {timing['wall_s']} s, CPU {timing['cpu_s']} s ({timing['torch_threads']} torch threads), {timing['date']}.")
    return "\n".join(lines) + "\n"
