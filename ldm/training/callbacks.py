"""Callbacks: image grids to the logger and to PNGs in the run directory, resolved-config saving."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image

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
            self._batch = {k: v[: self.max_images] for k, v in batch.items()}

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
