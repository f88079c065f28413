"""Callbacks: image grids to the logger and to PNGs in the run directory, per-rank seeds, data skip counts."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image

from ldm.data.shards import COUNT_KEYS

log = logging.getLogger(__name__)


def to_grid(rows: list[Tensor], nrow: int | None = None) -> Tensor:
    """Stack image batches in [-1, 1] as rows of one grid in [0, 1] (C x H x W)."""
    images = torch.cat([r.detach().float().cpu() for r in rows])
    nrow = nrow or rows[0].shape[0]
    return make_grid(((images + 1) / 2).clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)


class ImageLogger(pl.Callback):
    """After each validation, asks the module for image grids (`module.log_images(batch)`) and
    writes them as PNGs under `<run_dir>/images/` and to the logger (TensorBoard, W&B).

    The first validation batch is kept, so every grid shows the same inputs and progress is
    visible at a glance.
    """

    def __init__(self, dirpath: str, max_images: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.max_images = max_images
        self._batch: dict | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._batch is None and batch_idx == 0:
            self._batch = {k: v[: self.max_images] for k, v in batch.items() if isinstance(v, (Tensor, list))}

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batch is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        was_training = pl_module.training
        pl_module.eval()
        grids = pl_module.log_images(self._batch)
        pl_module.train(was_training)
        step = getattr(pl_module, "generator_step", trainer.global_step)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        for name, grid in grids.items():
            path = self.dirpath / f"{name}_step{step:07d}.png"
            save_image(grid, path)
            self._to_logger(trainer, name, grid, step)
        log.info("Wrote image grids %s to %s", sorted(grids), self.dirpath)

    @staticmethod
    def _to_logger(trainer: pl.Trainer, name: str, grid: Tensor, step: int) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"images/{name}", grid, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=f"images/{name}", images=[grid.permute(1, 2, 0).numpy()], step=None)


class PerRankSeed(pl.Callback):
    """Re-seeds each rank differently once training starts.

    `seed_everything` gives every DDP rank the same seed, which is right for building the model but
    would make every rank draw the same timesteps, noise, caption-dropout masks and posterior samples.
    The offset includes the step so a resumed run does not replay the randomness of its first steps.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(self.seed + 100_003 * trainer.global_rank + trainer.global_step, workers=True, verbose=False)


class DataCountsLogger(pl.Callback):
    """Logs what the data pipeline skipped, summed over DataLoader workers and ranks.

    Batches of ``ldm.data.shards.ShardedDataset`` carry ``data_counts``: what their worker read and
    skipped since its previous batch. This sums them per rank, all-reduces the sums every
    ``log_every_n_steps`` training batches (the same batches on every rank, since every rank runs the
    same number), writes ``data/<count>`` to the loggers (``data/samples`` came through; the others were
    skipped, by reason) and logs a summary at the end of training and of each validation (whose counts
    start afresh each time).
    """

    def __init__(self) -> None:
        self.train_counts: Counter[str] = Counter()
        self.val_counts: Counter[str] = Counter()
        self._batches = 0
        self._train_seen = self._val_seen = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        counts = batch.get("data_counts") if isinstance(batch, dict) else None
        if counts is None:
            return
        self._train_seen = True
        self.train_counts.update(counts)
        self._batches += 1
        if self._batches % max(1, trainer.log_every_n_steps) == 0:
            totals = self._all_ranks(trainer, pl_module, self.train_counts)
            if trainer.is_global_zero:
                metrics = {f"data/{key}": float(value) for key, value in totals.items() if value or key == "samples"}
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_counts.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        counts = batch.get("data_counts") if isinstance(batch, dict) else None
        if counts is not None:
            self._val_seen = True
            self.val_counts.update(counts)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_seen and not trainer.sanity_checking:
            self._summarise("validation", self._all_ranks(trainer, pl_module, self.val_counts), trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_seen:
            self._summarise("training", self._all_ranks(trainer, pl_module, self.train_counts), trainer)

    @staticmethod
    def _all_ranks(trainer: pl.Trainer, pl_module: pl.LightningModule, counts: Counter[str]) -> dict[str, int]:
        local = torch.tensor([counts[key] for key in COUNT_KEYS], dtype=torch.int64, device=pl_module.device)
        summed = trainer.strategy.reduce(local, reduce_op="sum")
        return dict(zip(COUNT_KEYS, summed.tolist()))

    @staticmethod
    def _summarise(what: str, totals: dict[str, int], trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        skipped = {key: value for key, value in totals.items() if key != "samples" and value}
        detail = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in skipped.items()) or "nothing"
        log.info("Data (%s, all ranks): %d samples came through; skipped: %s", what, totals["samples"], detail)
