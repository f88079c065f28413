"""What `python train.py` does, given the composed Hydra config."""

from __future__ import annotations

import copy
import logging
import secrets
import signal
import tempfile
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.checkpoints import read_checkpoint
from ldm.errors import ConfigError, LdmError
from ldm.training.autoencoder_module import optimizer_steps_for
from ldm.training.callbacks import LastCheckpoint, PerRankSeed, RequeueOnSignal, SameRunOnAllRanks, StopOnSignal
from ldm.training.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from ldm.training.run_lock import RunDirLock

log = logging.getLogger(__name__)


def _instantiate(cfg: DictConfig, what: str, **kwargs):
    """`hydra.utils.instantiate` with an error that names the config group and the bad key."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        cause = " ".join(str(err.__cause__ or err).split())  # one line: Hydra's import errors span several
        raise ConfigError(f"Could not build `{what}` from the config ({cfg.get('_target_', '?')}): {cause}") from err


def pin_run_dir(cfg: DictConfig, output_dir: str | Path) -> None:
    """Makes `cfg.run_dir` the directory Hydra runs in, resolved once.

    Lightning's DDP launcher starts the other ranks by re-running the command line with
    `hydra.run.dir=<rank 0's directory>` appended, and each child resolves `run_dir` again: a
    `${now:...}` in it would give every rank its own directory. Hydra's output directory is the
    one value all ranks share (in a sweep, it is the job's directory), so it is the run directory.
    """
    with open_dict(cfg):
        cfg.run_dir = str(output_dir)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`ckpt_path`: null (fresh run), a file, or "auto": the newest checkpoint of this run directory that
    reads back (`checkpoints/last.ckpt`, the `last.previous.ckpt` kept beside it, or the `hpc_ckpt_<n>.ckpt`
    of a SLURM requeue), if any. A given file that does not read back stops the run here, in one line."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":
        found = find_resume_checkpoint(run_dir)
        return str(found) if found else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist. Give the path of a .ckpt file to resume, or ckpt_path=null.")
    read_checkpoint(ckpt_path)  # safe and complete, or a one-line CheckpointError before anything is built
    return ckpt_path


def wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id of this run directory, so that a resumed run logs into the same W&B run: made by
    rank 0 the first time and kept in `<run_dir>/wandb_run_id` (other ranks do not log to W&B)."""
    path = run_dir / "wandb_run_id"
    if not path.is_file() and rank_zero_only.rank == 0:
        path.write_text(secrets.token_hex(8))
    return path.read_text().strip() if path.is_file() else None


def build_logger(cfg: DictConfig, run_dir: Path) -> pl.loggers.Logger | bool:
    if not cfg.get("logger"):
        return False
    extra = {}
    if cfg.logger.get("_target_", "").endswith("WandbLogger") and cfg.logger.get("id") is None:
        extra = {"id": wandb_run_id(run_dir), "resume": "allow"}
    return _instantiate(cfg.logger, "logger", **extra)


def build_callbacks(cfg: DictConfig, logger: pl.loggers.Logger | bool) -> list[pl.Callback]:
    """The optional callbacks: each non-null entry of the `callbacks` config group (configs/callbacks/), in
    its order, built by `hydra.utils.instantiate`. `~callbacks.NAME` or `callbacks.NAME=null` drops one,
    `+callbacks.NAME._target_=...` adds one. A progress bar is kept only with `trainer.enable_progress_bar`
    (Lightning refuses one otherwise) and a LearningRateMonitor only with a logger."""
    callbacks: list[pl.Callback] = []
    for name, entry in (cfg.get("callbacks") or {}).items():
        what = f"callbacks.{name}"
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigError(f"`{what}` must be a config with a `_target_` (or null to drop it), got {entry!r}.")
        callback = _instantiate(entry, what)
        if not isinstance(callback, pl.Callback):
            raise ConfigError(f"`{what}` ({entry._target_}) is not a Lightning Callback but a {type(callback).__name__}.")
        if isinstance(callback, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue
        if isinstance(callback, LearningRateMonitor) and not logger:
            continue
        callbacks.append(callback)
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, ckpt_path: str | None = None) -> pl.Trainer:
    if str(run_dir) != cfg.get("run_dir"):  # the callbacks' and logger's `${run_dir}` follow the given directory
        cfg = copy.deepcopy(cfg)
        pin_run_dir(cfg, run_dir)
    logger = build_logger(cfg, run_dir)
    # Built in code, not in the `callbacks` group: the machinery that resume and multi-process runs rely
    # on. PerRankSeed seeds each batch (exact resume), SameRunOnAllRanks checks that all ranks share the
    # run, LastCheckpoint owns last.ckpt (RequeueOnSignal, under SLURM, holds a reference to it). Lightning
    # runs Checkpoint callbacks after all others, in list order: the configured "best" ModelCheckpoint,
    # then LastCheckpoint, so the state last.ckpt saves includes everyone's for this step.
    last_checkpoint = LastCheckpoint(run_dir / "checkpoints", cfg.get("checkpoint_every_n_steps"))
    callbacks: list[pl.Callback] = [PerRankSeed(cfg.seed), SameRunOnAllRanks(run_dir, ckpt_path),
                                    *build_callbacks(cfg, logger)]
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # SIGUSR1 before the time limit: a collective stop, checkpoint and requeue
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(RequeueOnSignal(last_checkpoint))
    else:  # SIGTERM and SIGINT: a collective stop and checkpoint (RequeueOnSignal handles them under SLURM)
        callbacks.append(StopOnSignal(last_checkpoint))
    callbacks.append(last_checkpoint)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if cfg.stage.name == "autoencoder":
        trainer_cfg["max_steps"] = optimizer_steps_for(trainer_cfg.get("max_steps", -1), cfg.loss.disc_start)
    return _instantiate(OmegaConf.create(trainer_cfg), "trainer", callbacks=callbacks, logger=logger,
                        default_root_dir=str(run_dir), plugins=plugins)


class TrainingStopped(LdmError):
    """The run stopped on SIGTERM or SIGINT after writing last.ckpt; `train.py` exits with 128 + `signum`."""

    def __init__(self, signum: int, run_dir: Path, step: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; {run_dir / 'checkpoints' / 'last.ckpt'} holds it: "
                         "run the same command again to resume.")
        self.signum = signum


def check_writable(run_dir: Path) -> None:
    """The run directory and its checkpoints/ folder accept files, checked before anything is built (not at
    the first save, minutes or hours in). Nothing is left behind: a run that stops later in its preflight
    (ranks that disagree, a bad config) must not leave folders that look like a started run."""
    checkpoints = run_dir / "checkpoints"
    existing = checkpoints
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"run_dir={run_dir}: cannot write checkpoints into {checkpoints} ({err.strerror or err}).") from None


def train(cfg: DictConfig) -> dict[str, float]:
    """Builds data, module and trainer from `cfg`, fits, and returns the final logged metrics."""
    run_dir = Path(cfg.run_dir)
    check_writable(run_dir)
    lock = RunDirLock(run_dir).acquire() if rank_zero_only.rank == 0 else None
    try:
        return _train(cfg, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    if rank_zero_only.rank == 0:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    trainer = build_trainer(cfg, run_dir, ckpt_path)
    stopper = next(c for c in trainer.callbacks if isinstance(c, StopOnSignal))
    stopper.install()
    try:
        datamodule = _instantiate(cfg.data, "data")
        module = _instantiate(cfg.stage.module, "stage.module", max_nonfinite_steps=cfg.max_nonfinite_steps)
        if cfg.get("image_size") is not None and hasattr(module, "check_image_size"):
            module.check_image_size(int(cfg.image_size))
        if cfg.get("compile"):
            module.compile_network(**OmegaConf.to_container(cfg.get("compile_kwargs") or {}, resolve=True))
        log.info("Run directory: %s", run_dir.resolve())
        if ckpt_path:
            log.info("Resuming from %s", ckpt_path)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        stopper.restore()
    if getattr(module, "nonfinite", None) is not None and module.nonfinite.total_skipped:
        log.warning("Skipped %d steps with a NaN/Inf loss.", module.nonfinite.total_skipped)
    if stopper.stopped_by:
        raise TrainingStopped(stopper.stopped_by, run_dir, getattr(module, "generator_step", trainer.global_step))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("Final metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    log.info("Checkpoints: %s", run_dir / "checkpoints")
    return metrics
