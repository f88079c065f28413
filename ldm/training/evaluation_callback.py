"""The field's metrics during training: every K steps, N images, chosen metrics; curves to the logger and,
at the end of fit, a PNG plot of them in the run directory.

Stage 1: PSNR/SSIM/LPIPS/rFID of the first N validation images' reconstructions. Stage 2: FID/KID/IS/
precision/recall of N images generated (EMA UNet, DDIM, fixed seeds) for the first N validation captions
(a class-conditional model: their labels; an unconditional one: nothing), against those N validation images. Both through `ldm.evaluation.evaluate`, the code of
`python evaluate.py`, so the numbers during training and after it are the same measurement.

Enable with ``callbacks=with_eval`` (configs/callbacks/with_eval.yaml) or add it to any callback set:
``+callbacks.evaluation._target_=ldm.training.evaluation_callback.EvaluationCallback +callbacks.evaluation.dirpath=...``.
Its history is saved in checkpoints, so a resumed run's curves continue.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ldm.diffusion.samplers import DDIMSampler
from ldm.errors import ConfigError
from ldm.evaluation import metrics as M
from ldm.evaluation.evaluate import generate, generation_inputs, generation_metrics_of, reconstruction_metrics
from ldm.evaluation.inception import InceptionFeatureExtractor, load_inception

log = logging.getLogger(__name__)


class EvaluationCallback(pl.Callback):
    """Evaluates the module being trained every ``every_n_steps`` steps (autoencoder steps in stage 1,
    optimizer steps in stage 2) and at the end of training, on ``n_images`` validation images.

    ``metrics``: names of the stage's metrics (null: all; the other stage's names are ignored, so one
    list can serve both). Generation uses ``steps`` DDIM steps at ``guidance_scale``. The reference
    features are computed once (and cached on disk in ``feature_cache``). Curves go to the loggers as
    ``eval/<metric>``; ``<dirpath>/metrics.json`` holds the history, ``<dirpath>/metrics.png`` its plot.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 500,
        n_images: int = 64,
        metrics: Sequence[str] | None = None,
        batch_size: int = 16,
        steps: int = 25,
        guidance_scale: float = 5.0,
        inception_weights: str = "auto",
        feature_cache: str | None = None,
        lpips: str = "auto",
        at_train_end: bool = True,
    ) -> None:
        if every_n_steps < 1 or n_images < 4 or batch_size < 1:
            raise ConfigError(f"callbacks.evaluation: every_n_steps ({every_n_steps}) must be >= 1, n_images ({n_images}) >= 4, "
                              f"batch_size ({batch_size}) >= 1.")
        known = set(M.GENERATION_METRICS) | set(M.RECONSTRUCTION_METRICS)
        if metrics is not None and set(metrics) - known:
            raise ConfigError(f"callbacks.evaluation.metrics: unknown {sorted(set(metrics) - known)}; choose from {sorted(known)}.")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.n_images, self.batch_size = every_n_steps, n_images, batch_size
        self.metrics = list(metrics) if metrics is not None else None
        self.steps, self.guidance_scale = steps, guidance_scale
        self.inception_weights, self.feature_cache, self.lpips_choice = inception_weights, feature_cache, lpips
        self.at_train_end = at_train_end
        self.history: list[dict[str, Any]] = []
        self._extractor: InceptionFeatureExtractor | None = None
        self._lpips: torch.nn.Module | None = None
        self._reference: M.Features | None = None
        self._images: Tensor | None = None
        self._captions: list[str] | None = None
        self._labels: list[int] | None = None

    # --- what to evaluate ------------------------------------------------------------------------

    @staticmethod
    def _stage(pl_module: pl.LightningModule) -> str:
        return "ldm" if hasattr(pl_module, "generation_model") else "autoencoder"

    @staticmethod
    def _step(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        return int(getattr(pl_module, "generator_step", trainer.global_step))

    def _names(self, stage: str) -> list[str]:
        allowed = M.RECONSTRUCTION_METRICS if stage == "autoencoder" else M.GENERATION_METRICS
        return [m for m in (self.metrics or allowed) if m in allowed]

    def _held_out(self, trainer: pl.Trainer) -> tuple[Tensor, list[str]]:
        """The first n_images validation images (in [-1, 1]) and captions (and labels, where the data has
        them: `self._labels`), read once."""
        if self._images is None:
            datamodule = trainer.datamodule
            dataset: Dataset | None = getattr(datamodule, "val_set", None)
            images, captions, labels = [], [], []
            if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
                for index in range(min(self.n_images, len(dataset))):
                    sample = dataset[index]
                    images.append(sample["image"])
                    captions.append(sample["caption"])
                    labels.append(sample.get("label"))
                images_t = torch.stack(images) if images else torch.empty(0)
            else:  # streamed validation batches (shards)
                parts = []
                for batch in datamodule.val_dataloader():
                    if "image" not in batch:
                        raise ConfigError("callbacks.evaluation needs validation images; this data gives none (a latent cache?).")
                    parts.append(batch["image"])
                    captions += list(batch["caption"])
                    labels += [int(label) for label in batch["label"]] if "label" in batch else [None] * len(batch["image"])
                    if sum(len(p) for p in parts) >= self.n_images:
                        break
                images_t = torch.cat(parts)[: self.n_images] if parts else torch.empty(0)
                captions, labels = captions[: self.n_images], labels[: self.n_images]
            if len(images_t) < 4:
                raise ConfigError(f"callbacks.evaluation needs at least 4 validation images, the data has {len(images_t)}.")
            self._images, self._captions = images_t.float(), captions
            self._labels = None if any(label is None for label in labels) else [int(label) for label in labels]
        return self._images, self._captions

    def _batches(self, images: Tensor):
        for start in range(0, len(images), self.batch_size):
            yield images[start : start + self.batch_size]

    def _inception(self, device: torch.device) -> InceptionFeatureExtractor:
        if self._extractor is None:
            self._extractor = load_inception(self.inception_weights, device)
        return self._extractor

    def _reference_features(self, trainer: pl.Trainer, device: torch.device) -> M.Features:
        if self._reference is None:
            images, _ = self._held_out(trainer)
            extractor = self._inception(device)
            val_set = getattr(trainer.datamodule, "val_set", None)
            description = {"dataset": type(val_set).__name__, **{k: v for k, v in vars(val_set).items() if _plain(v)}} \
                if val_set is not None else {"dataset": type(trainer.datamodule).__name__, "val_urls": str(getattr(trainer.datamodule, "val_urls", ""))}
            key = M.cache_key(description, len(images), images.shape[-1], extractor)
            self._reference, _ = M.reference_features(extractor, lambda: self._batches(images), len(images),
                                                      M.FeatureCache(self.feature_cache), key, description)
        return self._reference

    # --- running it ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        stage, step = self._stage(pl_module), self._step(trainer, pl_module)
        if self.history and self.history[-1]["step"] == step:
            return None
        names = self._names(stage)
        if not names:
            return None
        started = time.perf_counter()
        images, captions = self._held_out(trainer)
        device = pl_module.device
        was_training = pl_module.training
        pl_module.eval()
        try:
            if stage == "autoencoder":
                extractor = self._inception(device) if "rfid" in names else None
                reference = self._reference_features(trainer, device) if "rfid" in names else None
                if "lpips" in names and self._lpips is None:
                    self._lpips = M.load_lpips(self.lpips_choice)[0].to(device)
                numbers, _ = reconstruction_metrics(pl_module.autoencoder, self._batches(images), extractor, self._lpips, names, reference)
            else:
                reference = self._reference_features(trainer, device)
                model = pl_module.generation_model()
                sampler = DDIMSampler(pl_module.schedule, self.steps, eta=0.0)
                size = images.shape[-2:]
                inputs = generation_inputs(model, captions, self._labels)
                batches = generate(model, sampler, inputs["prompts"], list(range(len(captions))), (int(size[0]), int(size[1])), self.batch_size,
                                   class_labels=inputs["class_labels"],
                                   guidance_scale=self.guidance_scale)
                numbers, _ = generation_metrics_of(batches, self._inception(device), reference, names,
                                                   kid_subset_size=min(1000, len(images)), is_splits=min(10, len(images)))
        finally:
            pl_module.train(was_training)
        numbers = {k: v for k, v in numbers.items() if isinstance(v, (int, float))}
        entry = {"step": step, **numbers, "seconds": round(time.perf_counter() - started, 1)}
        self.history.append(entry)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"eval/{k}": float(v) for k, v in numbers.items()}, step=step)
            log.info("Evaluation at step %d (%d images, %.0f s): %s", step, len(images), entry["seconds"],
                     ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
            self._write()
        return entry

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = self._step(trainer, pl_module)
        if step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end:
            self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            self._write(plot=True)

    # --- output ----------------------------------------------------------------------------------

    def _write(self, plot: bool = False) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "metrics.json").write_text(json.dumps(self.history, indent=1) + "\n", encoding="utf-8")
        if plot:
            path = plot_history(self.history, self.dirpath / "metrics.png")
            log.info("Wrote the evaluation curves to %s", path)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def _plain(value: Any) -> bool:
    """A dataset attribute that describes it (numbers, strings, short tuples of them), not its contents."""
    if isinstance(value, (int, float, str, bool)):
        return True
    return isinstance(value, tuple) and len(value) <= 16 and all(isinstance(v, (int, float, str, bool)) for v in value)


def plot_history(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per metric against the training step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in history[0] if k not in ("step", "seconds") and not k.endswith("_std")]
    columns = min(3, len(names)) or 1
    rows = -(-len(names) // columns) or 1
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    steps = [entry["step"] for entry in history]
    for axis, name in zip(axes.flat, names):
        values = [entry.get(name) for entry in history]
        axis.plot(steps, values, marker="o")
        std = [entry.get(f"{name}_std") for entry in history]
        if all(s is not None for s in std):
            axis.fill_between(steps, [v - s for v, s in zip(values, std)], [v + s for v, s in zip(values, std)], alpha=0.2)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
