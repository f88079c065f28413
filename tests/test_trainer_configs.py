"""Trainer configs (ddp, fsdp, precision, accumulation, clipping), torch.compile, the run directory shared by
all ranks, and the W&B run that a resumed run continues."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import OmegaConf

from ldm.checkpoints import load_autoencoder
from ldm.modules.attention import SpatialTransformer
from ldm.modules.autoencoder import ResnetBlock
from ldm.modules.unet import ResBlock
from ldm.training.checkpointing import AtomicCheckpointIO
from ldm.training.run import build_logger, build_trainer, pin_run_dir, train, wandb_run_id
from train_helpers import TINY_AUTOENCODER, TINY_LDM, compose_config


def _strategy(cfg):
    return hydra.utils.instantiate(OmegaConf.to_container(cfg.trainer, resolve=True)["strategy"])


@pytest.mark.parametrize(("stage", "find_unused"), [(TINY_AUTOENCODER, True), (TINY_LDM, False)])
def test_ddp_config_builds_lightnings_ddp_strategy(tmp_path: Path, stage: list[str], find_unused: bool) -> None:
    cfg = compose_config(str(tmp_path), [*stage, "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=4"])
    strategy = _strategy(cfg)
    assert isinstance(strategy, DDPStrategy) and (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 4)
    # Stage 1's two backward passes per batch each leave the other network's weights unused.
    assert strategy._ddp_kwargs["find_unused_parameters"] is find_unused
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.use_distributed_sampler is False  # our samplers shard and resume themselves


def test_fsdp_config_wraps_the_unets_blocks_and_saves_a_full_state_dict(tmp_path: Path) -> None:
    cfg = compose_config(str(tmp_path), [*TINY_LDM, "trainer=fsdp", "trainer.precision=16-mixed",
                                         "trainer.accumulate_grad_batches=4", "trainer.gradient_clip_val=1.0"])
    strategy = _strategy(cfg)
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {ResBlock, SpatialTransformer, ResnetBlock}
    assert (cfg.trainer.precision, cfg.trainer.accumulate_grad_batches, cfg.trainer.gradient_clip_val) == ("16-mixed", 4, 1.0)


def test_trainer_writes_checkpoints_atomically(tmp_path: Path) -> None:
    trainer = build_trainer(compose_config(str(tmp_path), TINY_AUTOENCODER), tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_the_run_dir_is_hydras_output_dir_resolved_once(tmp_path: Path) -> None:
    cfg = compose_config(str(tmp_path / "${now:%f}"), TINY_AUTOENCODER)
    pin_run_dir(cfg, tmp_path / "rank0")
    assert cfg.run_dir == str(tmp_path / "rank0") and cfg.logger.save_dir == str(tmp_path / "rank0")


def test_compile_true_compiles_the_trained_network_and_keeps_checkpoint_names(tmp_path: Path) -> None:
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    cfg = compose_config(str(tmp_path), [*TINY_AUTOENCODER, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                         "compile=true", "compile_kwargs.backend=aot_eager"])
    train(cfg)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo captured the autoencoder's graphs
    autoencoder = load_autoencoder(tmp_path / "checkpoints" / "last.ckpt")  # strict: no "_orig_mod." in the names
    assert sum(p.numel() for p in autoencoder.parameters()) > 0
    torch._dynamo.reset()


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path: Path) -> None:
    run_id = wandb_run_id(tmp_path)
    (tmp_path / "other").mkdir()
    assert run_id and wandb_run_id(tmp_path) == run_id and wandb_run_id(tmp_path / "other") != run_id
    cfg = compose_config(str(tmp_path), [*TINY_AUTOENCODER, "logger=wandb", "logger.offline=true"])
    logger = build_logger(cfg, tmp_path)
    assert logger._wandb_init["id"] == run_id and logger._wandb_init["resume"] == "allow"
