"""Callbacks: image grids, per-batch seeds, data skip counts, last.ckpt, SLURM requeue, and the check that all
ranks run the same run."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
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
        if self._batch is None or trainer.sanity_checking:
            return
        # Every rank runs the networks (under FSDP each forward gathers shards from all ranks); rank 0 writes.
        was_training = pl_module.training
        pl_module.eval()
        grids = pl_module.log_images(self._batch)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
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
    """Seeds every training batch from (seed, rank, batch index).

    `seed_everything` gives every DDP rank the same seed, which is right for building the model but
    would make every rank draw the same timesteps, noise, caption-dropout masks and posterior samples.
    Seeding each batch from its index (Lightning's, restored from checkpoints) also makes a resumed run
    draw exactly the numbers an uninterrupted run draws, so together with the resumable data order it
    reaches the same weights.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        seed_all(self.seed + 100_003 * trainer.global_rank + 1_000_003 * trainer.fit_loop.total_batch_idx)


def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's (all devices) global generators, without seed_everything's logging."""
    seed %= 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LastCheckpoint(Checkpoint):
    """Owns `checkpoints/last.ckpt`: writes it every `every_n_steps` training steps, after each validation
    and when training ends (the "best" ModelCheckpoint does not write a last of its own).

    A step is an optimizer step of stage 2 (`accumulate_grad_batches` batches, so a checkpoint never
    falls inside an accumulation, whose gradients it could not hold) and an autoencoder step of stage 1
    (one batch; Lightning's own `every_n_train_steps` counts both of its optimizers and can step over
    a multiple). Writes go through the trainer's checkpoint IO, which is atomic. As a `Checkpoint`,
    Lightning runs it after the other callbacks, so the state it saves includes theirs for this step.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int | None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps must be positive or null, got {every_n_steps}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self._saved_after: int | None = None  # the batch count at the latest save

    def save(self, trainer: pl.Trainer) -> None:
        """Writes last.ckpt (on every rank's call, as a collective) unless it already holds this batch."""
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        if batches != self._saved_after:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_after = batches

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        batches = self.every_n_steps and self.every_n_steps * trainer.accumulate_grad_batches
        if batches and (trainer.fit_loop.total_batch_idx + 1) % batches == 0:
            self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


class SameRunOnAllRanks(pl.Callback):
    """Stops every rank with one clear message if the ranks disagree on the run directory or on the
    checkpoint they resume from.

    Each process of a multi-process run composes its own config. Launched by Lightning, the children
    are handed rank 0's run directory; launched by `srun` (or torchrun), each resolves `run_dir` itself,
    and a `${now:...}` in it can differ by a second — then one rank would resume from a checkpoint and
    another start afresh. The SLURM scripts pass an explicit `run_dir`; this check catches the rest
    before any weights are loaded.
    """

    def __init__(self, run_dir: str | Path, ckpt_path: str | None) -> None:
        self.identity = (str(Path(run_dir).resolve()), str(Path(ckpt_path).resolve()) if ckpt_path else None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        reference = trainer.strategy.broadcast(self.identity, src=0)
        differs = torch.tensor(float(reference != self.identity), device=trainer.strategy.root_device)
        if float(trainer.strategy.reduce(differs, reduce_op="sum")) > 0:
            here = (f"rank {trainer.global_rank} has run_dir={self.identity[0]}, ckpt_path={self.identity[1]}"
                    if reference != self.identity else f"rank {trainer.global_rank} agrees with rank 0, another rank does not")
            raise RuntimeError(
                f"The ranks of this run disagree on its run directory or resume checkpoint: rank 0 has "
                f"run_dir={reference[0]}, ckpt_path={reference[1]}; {here}. Pass one explicit run_dir=... to every "
                "rank (slurm/*.sbatch do)."
            )


class StopOnSignal(pl.Callback):
    """SIGTERM (how schedulers, containers and preemptible VMs stop a job) and SIGINT (Ctrl-C): every rank
    stops at the end of the same batch, `last.ckpt` is written (atomically, as always), and the run ends
    with `stopped_by` set, so that `train.py` exits with 128 + the signal's number and the same command
    resumes. A second Ctrl-C interrupts at once.

    Lightning's own SIGTERM handling ends the process with exit code 0 and no checkpoint. Here the
    handler only sets a flag, and the ranks agree on it after every batch with one max-reduction of a
    single number, so the stop is collective: a rank that saved alone would meet the others' gradient
    all-reduce in its checkpoint barrier and hang.
    """

    def __init__(self, last_checkpoint: LastCheckpoint, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.last_checkpoint = last_checkpoint
        self.signums = tuple(signums)
        self.received = 0
        self.stopping = False
        self.stopped_by: int | None = None
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum

    def install(self) -> None:
        """Takes the signals over, keeping the handlers it replaces for `restore`. `train` calls this before
        building anything, so a signal during set-up stops the run after its first batch rather than
        killing it; `on_train_start` takes them back from the handler Lightning installs at fit start."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        for signum in self.signums:
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its own SIGTERM handler after on_fit_start (it would end the run with exit
        # code 0 and no checkpoint); a SIGTERM it caught in between is taken over.
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:
            connector.received_sigterm = False
            self.received = self.received or signal.SIGTERM
        if threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                signal.signal(signum, self._on_signal)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        signum = self.received
        if trainer.world_size > 1:  # one rank alone reads its flag without a tensor (a GPU sync every batch)
            flag = torch.tensor(float(signum), device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max"))
        if signum > 0 and not self.stopping:
            log.warning("%s: stopping after batch %d to write last.ckpt.", signal.Signals(signum).name,
                        trainer.fit_loop.total_batch_idx + 1)
            self.stopping = True
            self.stopped_by = signum
            # Saved here, at the batch end, like the periodic checkpoints: Lightning resumes its loop
            # counters (the logging step too) exactly from this point.
            self.last_checkpoint.save(trainer)
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.restore()


class RequeueOnSignal(StopOnSignal):
    """Under SLURM: its warning before the time limit (`#SBATCH --signal=SIGUSR1@90`) stops the run as
    SIGTERM does, then rank 0 requeues the job, which comes back with the same id and run directory and
    resumes from `last.ckpt` (`ckpt_path=auto`). SIGTERM and SIGINT (scancel, the time limit itself) stop
    and checkpoint without a requeue.
    """

    def __init__(self, last_checkpoint: LastCheckpoint, signum: int = signal.SIGUSR1) -> None:
        super().__init__(last_checkpoint, (signum, signal.SIGTERM, signal.SIGINT))
        self.signum = signum

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.stopped_by != self.signum:
            return
        self.stopped_by = None  # a requeue is a planned stop: the process ends normally
        if trainer.is_global_zero:  # last.ckpt is written by now
            job = os.environ["SLURM_JOB_ID"]
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode == 0:
                log.info("Requeued SLURM job %s.", job)
            else:
                log.error("Could not requeue SLURM job %s: %s", job, done.stderr.strip())


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
        self._summarise_datasets(trainer, pl_module)

    @staticmethod
    def _summarise_datasets(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Map datasets that count their own unreadable files (`skipped`, e.g. a folder of images: at
        construction and, in any DataLoader worker, at decode time) report their totals at the end."""
        datamodule = trainer.datamodule
        for split in ("train_set", "val_set"):
            dataset = getattr(datamodule, split, None)
            skipped = getattr(dataset, "skipped", None)
            if skipped is None or isinstance(skipped, Tensor):
                continue
            local = torch.tensor([int(skipped)], dtype=torch.int64, device=pl_module.device)
            total = int(trainer.strategy.reduce(local, reduce_op="max"))  # every rank holds the same files
            if trainer.is_global_zero:
                log.info("Data (%s): %d unreadable image(s) skipped in all (%d found when the dataset was built, %d at decode time).",
                         split.removesuffix("_set"), total, getattr(dataset, "unreadable_at_start", 0),
                         total - getattr(dataset, "unreadable_at_start", 0))

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
