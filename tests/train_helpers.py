"""Composing the real Hydra configs for tests, with tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

TINY_AUTOENCODER = [
    "image_size=32",
    "data.train.length=64",
    "data.val.length=16",
    "data.batch_size=8",
    "model.resolution=32",
    "loss/perceptual=none",
    "loss.disc_start=1000",
    "stage.module.lr_warmup_steps=0",
    "loss.discriminator.ndf=8",
    "loss.discriminator.n_layers=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
]


def compose_config(run_dir: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"run_dir={run_dir}", *overrides])
    return cfg

TINY_LDM = [
    "stage=ldm",
    "image_size=32",
    "data.train.length=64",
    "data.val.length=16",
    "data.batch_size=8",
    "stage.module.sample_steps=4",
    "stage.module.scale_factor_batches=2",
    "stage.module.lr_warmup_steps=1",
    "stage.module.optimizer.lr=1e-3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
]


def train_command(repo_root: str, overrides: list[str]) -> list[str]:
    """`python train.py ...` as a subprocess command (Lightning's DDP launcher re-runs sys.argv, so
    multi-process runs are tested this way, never in the pytest process)."""
    return [sys.executable, os.path.join(repo_root, "train.py"), *overrides]


def run_train(repo_root: str, overrides: list[str], timeout: float = 600, cmd: list[str] | None = None,
              **kwargs) -> subprocess.CompletedProcess:
    """Runs `python train.py overrides` (or `cmd + overrides`) in the repository, capturing its output."""
    command = [*cmd, *overrides] if cmd else train_command(repo_root, overrides)
    return subprocess.run(command, cwd=kwargs.pop("cwd", repo_root), capture_output=True, text=True, timeout=timeout, **kwargs)
