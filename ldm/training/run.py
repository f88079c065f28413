"""What `python train.py` does, given the composed Hydra config."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from ldm.training.autoencoder_module import optimizer_steps_for
from ldm.training.callbacks import DataCountsLogger, ImageLogger, PerRankSeed

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


def _instantiate(cfg: DictConfig, what: str, **kwargs):
    """`hydra.utils.instantiate` with an error that names the config group and the bad key."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        cause = err.__cause__ or err
        raise ConfigError(f"Could not build `{what}` from the config ({cfg.get('_target_', '?')}): {cause}") from err


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist. Give the path of a .ckpt file to resume, or ckpt_path=null.")
    return ckpt_path


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best-{step}",
            monitor=cfg.stage.get("monitor"),
            mode=cfg.stage.get("monitor_mode", "min"),
            save_last=True,
            save_top_k=1,
        ),
        ImageLogger(dirpath=str(run_dir / "images")),
        PerRankSeed(cfg.seed),
        DataCountsLogger(),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    logger = _instantiate(cfg.logger, "logger") if cfg.get("logger") else False
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if cfg.stage.name == "autoencoder":
        trainer_cfg["max_steps"] = optimizer_steps_for(trainer_cfg.get("max_steps", -1), cfg.loss.disc_start)
    return _instantiate(OmegaConf.create(trainer_cfg), "trainer", callbacks=callbacks, logger=logger, default_root_dir=str(run_dir))


def train(cfg: DictConfig) -> dict[str, float]:
    """Builds data, module and trainer from `cfg`, fits, and returns the final logged metrics."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    datamodule = _instantiate(cfg.data, "data")
    module = _instantiate(cfg.stage.module, "stage.module", max_nonfinite_steps=cfg.max_nonfinite_steps)
    trainer = build_trainer(cfg, run_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    log.info("Run directory: %s", run_dir.resolve())
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if getattr(module, "nonfinite", None) is not None and module.nonfinite.total_skipped:
        log.warning("Skipped %d steps with a NaN/Inf loss.", module.nonfinite.total_skipped)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("Final metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    log.info("Checkpoints: %s", run_dir / "checkpoints")
    return metrics
