"""configs/experiment/ (the recipes of the measured runs and the SD-size GPU recipes) and configs/callbacks/
(the optional callbacks, built from the config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, Timer, TQDMProgressBar
from omegaconf import OmegaConf

from ldm.checkpoints.io import read_checkpoint
from ldm.errors import ConfigError as LdmConfigError
from ldm.training import run
from ldm.training.callbacks import (
    DataCountsLogger,
    ImageLogger,
    LastCheckpoint,
    PerRankSeed,
    RequeueOnSignal,
    SameRunOnAllRanks,
    StopOnSignal,
)
from ldm.training.run import ConfigError, build_trainer, train
from train_helpers import CONFIG_DIR, TINY_AUTOENCODER, TINY_LDM, compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
SHAPES_RECIPES = ["shapes_autoencoder_1500", "shapes_ldm_22k"]
GPU_RECIPES = ["kl_f8_gpu", "sd15_gpu", "sd21_gpu", "sd15_finetune_gpu"]
# What each recipe must say: dotted key -> value.
EXPECTED = {
    "shapes_autoencoder_1500": {
        "stage.name": "autoencoder", "model._target_": "ldm.modules.autoencoder.KLAutoencoder", "model.ch": 16,
        "trainer.max_steps": 1500, "trainer.val_check_interval": 500, "loss.disc_start": 1300,
        "loss.discriminator.ndf": 64, "stage.module.lr_decay_steps": 1500, "image_size": 32,
        "trainer.accelerator": "cpu",
    },
    "shapes_ldm_22k": {
        "stage.name": "ldm", "trainer.max_steps": 22000, "trainer.val_check_interval": 1000,
        "stage.module.lr_decay_start": 20000, "stage.module.lr_decay_steps": 22000,
        "stage.module.optimizer.lr": 5e-4, "stage.module.prediction": "v", "schedule.zero_terminal_snr": True,
        "model.model_channels": 32, "image_size": 32, "trainer.accelerator": "cpu",
    },
    "emoji_autoencoder_1500": {
        "stage.name": "autoencoder", "data.train._target_": "ldm.data.emoji.EmojiDataset", "image_size": 32,
        "trainer.max_steps": 1500, "loss.disc_start": 1300, "callbacks.evaluation.every_n_steps": 250,
        "callbacks.evaluation._target_": "ldm.training.evaluation_callback.EvaluationCallback", "trainer.accelerator": "cpu",
    },
    "emoji_ldm_10k": {
        "stage.name": "ldm", "data.train._target_": "ldm.data.emoji.EmojiDataset", "image_size": 32, "trainer.max_steps": 10000,
        "callbacks.evaluation.every_n_steps": 1000, "callbacks.evaluation.metrics": ["fid", "kid", "precision", "recall"],
        "trainer.accelerator": "cpu",
    },
    "emoji_class_ldm": {
        "stage.name": "ldm", "data.train._target_": "ldm.data.emoji.EmojiDataset", "data.train.label": "group",
        "conditioning._target_": "ldm.modules.conditioning.ClassConditioner", "conditioning.num_classes": 11,
        "trainer.max_steps": 10000, "callbacks.evaluation.metrics": ["fid", "kid", "precision", "recall"], "trainer.accelerator": "cpu",
    },
    "shapes_class_ldm": {
        "stage.name": "ldm", "conditioning._target_": "ldm.modules.conditioning.ClassConditioner", "conditioning.num_classes": 24,
        "data.train.holdout": [], "data.val.holdout": [], "trainer.max_steps": 14000, "stage.module.lr_decay_start": 12000,
        "image_size": 32, "trainer.accelerator": "cpu",
    },
    "shapes_uncond_ldm": {
        "stage.name": "ldm", "conditioning._target_": "ldm.modules.conditioning.Unconditional", "trainer.max_steps": 10000,
        "image_size": 32, "trainer.accelerator": "cpu",
    },
    "shapes_inpaint_ldm": {
        "stage.name": "ldm", "conditioning._target_": "ldm.modules.conditioning.InpaintingConditioner",
        "conditioning.base._target_": "ldm.modules.conditioning.TextConditioner", "data.train.holdout": [], "trainer.max_steps": 10000,
        "image_size": 32, "trainer.accelerator": "cpu",
    },
    "shapes_sr4_ldm": {
        "stage.name": "ldm", "conditioning._target_": "ldm.modules.conditioning.SuperResolutionConditioner", "conditioning.factor": 4,
        "trainer.max_steps": 6000, "stage.module.lr_decay_start": 4000, "image_size": 32, "trainer.accelerator": "cpu",
    },
    "kl_f8_gpu": {
        "stage.name": "autoencoder", "model.ch": 128, "model.ch_mult": [1, 2, 4, 4], "image_size": 256,
        "trainer.accelerator": "gpu", "trainer.precision": "bf16-mixed", "loss.pixel_loss": "l1",
        "loss.perceptual_weight": 1.0, "loss.perceptual_samples": None, "loss.adaptive_weight_max": 1e4,
        "loss.disc_start": 50001, "loss.kl_weight": 1e-6, "loss.discriminator.ndf": 64,
        "loss.perceptual._target_": "ldm.losses.perceptual.LPIPS",
        "data._target_": "ldm.training.datamodule.ImageCaptionDataModule",
    },
    "sd15_gpu": {
        "stage.name": "ldm", "model.model_channels": 320, "model.context_dim": 768, "text_encoder.arch": "ViT-L-14",
        "text_encoder.pretrained": "openai", "schedule.kind": "scaled_linear", "schedule.zero_terminal_snr": False,
        "stage.module.prediction": "eps", "stage.module.scale_factor": 0.18215, "stage.module.optimizer.lr": 1e-4,
        "image_size": 512, "trainer.accelerator": "gpu", "trainer.precision": "bf16-mixed", "data.batch_size": 16,
    },
    "sd21_gpu": {
        "stage.name": "ldm", "model.model_channels": 320, "model.context_dim": 1024, "text_encoder.arch": "ViT-H-14",
        "schedule.kind": "scaled_linear", "schedule.zero_terminal_snr": False, "stage.module.prediction": "eps",
        "stage.module.scale_factor": 0.18215, "stage.module.optimizer.lr": 1e-4, "image_size": 512,
        "trainer.accelerator": "gpu", "trainer.precision": "bf16-mixed", "data.batch_size": 16,
    },
    "sd15_finetune_gpu": {
        "stage.name": "ldm", "init_from": "/dummy/v1-5-pruned-emaonly.safetensors",
        "stage.module.init_from": "/dummy/v1-5-pruned-emaonly.safetensors", "stage.module.optimizer.lr": 1e-5,
        "model.gradient_checkpointing": True, "image_size": 512, "trainer.accelerator": "gpu",
        "trainer.precision": "bf16-mixed", "data.batch_size": 8,
    },
}
# The command lines the measured shapes runs were trained with (docs/results.md), which the recipes replace.
MEASURED_COMMANDS = {
    "shapes_autoencoder_1500": ["stage=autoencoder", "trainer.max_steps=1500", "trainer.val_check_interval=500",
                                "loss.disc_start=1300", "loss.discriminator.ndf=64"],
    "shapes_ldm_22k": ["stage=ldm", "trainer.max_steps=22000", "stage.module.lr_decay_start=20000",
                       "stage.module.lr_decay_steps=22000"],
}
# What a run of a recipe needs on the command line besides it.
REQUIRED = {"shapes_ldm_22k": ["autoencoder_ckpt=/dummy/last.ckpt"],
            **{name: ["autoencoder_ckpt=/dummy/last.ckpt"] for name in ("shapes_class_ldm", "shapes_uncond_ldm", "shapes_inpaint_ldm",
                                                                        "shapes_sr4_ldm")},
            "emoji_ldm_10k": ["autoencoder_ckpt=/dummy/last.ckpt"],
            "emoji_class_ldm": ["autoencoder_ckpt=/dummy/last.ckpt"],
            "kl_f8_gpu": ["data.train.root=/data/images"],
            "sd15_gpu": ["autoencoder_ckpt=/dummy/last.ckpt", "data.train.root=/data/images"],
            "sd21_gpu": ["autoencoder_ckpt=/dummy/last.ckpt", "data.train.root=/data/images"],
            "sd15_finetune_gpu": ["init_from=/dummy/v1-5-pruned-emaonly.safetensors", "data.train.root=/data/images"]}
# Tiny data and quiet trainers for running a recipe a few steps on the CPU.
TINY_RUN = ["data.train.length=64", "data.val.length=16", "data.batch_size=8", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "logger=csv"]


def _experiment(tmp_path: Path, name: str, *overrides: str):
    return compose_config(str(tmp_path), [f"experiment={name}", *REQUIRED.get(name, []), *overrides])


# --- the recipes ------------------------------------------------------------------------------------


def test_the_experiment_group_holds_the_recipes() -> None:
    assert set(EXPECTED) == set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_recipe_composes_resolves_and_says_what_it_trains(tmp_path: Path, name: str) -> None:
    path = Path(CONFIG_DIR) / "experiment" / f"{name}.yaml"
    lines = path.read_text().splitlines()
    assert lines[0] == "# @package _global_"
    header = [line for line in lines[1:6] if line.startswith("#")]
    assert 2 <= len(header) <= 4 and any(f"python train.py experiment={name}" in line for line in header)
    assert any("docs/results.md" in line for line in header)
    cfg = _experiment(tmp_path, name)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # no ??? left, every ${} resolves
    for key, value in EXPECTED[name].items():
        assert OmegaConf.select(cfg, key) == value, key
    assert resolved["run_dir"] == str(tmp_path)


@pytest.mark.parametrize("name", sorted(MEASURED_COMMANDS))
def test_the_shapes_recipes_are_exactly_the_measured_command_lines(tmp_path: Path, name: str) -> None:
    recipe = OmegaConf.to_container(_experiment(tmp_path, name), resolve=True)
    command = OmegaConf.to_container(compose_config(str(tmp_path), [*MEASURED_COMMANDS[name], *REQUIRED.get(name, [])]),
                                     resolve=True)
    assert recipe == command


def test_the_command_line_overrides_a_recipe(tmp_path: Path) -> None:
    cfg = _experiment(tmp_path, "shapes_ldm_22k", "trainer.max_steps=30000", "stage.module.lr_decay_start=28000")
    assert (cfg.trainer.max_steps, cfg.stage.module.lr_decay_start, cfg.stage.module.lr_decay_steps) == (30000, 28000, 22000)


def test_the_kl_f8_recipes_autoencoder_is_the_sd_vae(tmp_path: Path) -> None:
    import hydra

    model = hydra.utils.instantiate(_experiment(tmp_path, "kl_f8_gpu").model)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


def test_the_shapes_autoencoder_recipe_trains(tmp_path: Path) -> None:
    cfg = _experiment(tmp_path, "shapes_autoencoder_1500", *TINY_RUN)
    metrics = train(cfg)
    assert "val/psnr" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["loss"]["disc_start"], saved["loss"]["discriminator"]["ndf"]) == (1300, 64)


def test_the_shapes_ldm_recipe_trains_on_a_stage_1_checkpoint(tmp_path: Path, tiny_autoencoder_ckpt: str) -> None:
    cfg = _experiment(tmp_path, "shapes_ldm_22k", f"autoencoder_ckpt={tiny_autoencoder_ckpt}", *TINY_RUN,
                      "stage.module.sample_steps=2", "stage.module.scale_factor_batches=2")
    metrics = train(cfg)
    assert "val/loss" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and list((tmp_path / "images").glob("*.png"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["stage"]["module"]["lr_decay_start"], saved["stage"]["module"]["lr_decay_steps"]) == (20000, 22000)


def test_the_emoji_class_recipe_trains_and_measures_class_conditional_fid(tmp_path: Path, tiny_autoencoder_ckpt: str) -> None:
    tiny_emoji_run = [o for o in TINY_RUN if not o.startswith(("data.train.length", "data.val.length"))]
    cfg = _experiment(tmp_path, "emoji_class_ldm", f"autoencoder_ckpt={tiny_autoencoder_ckpt}", *tiny_emoji_run, "+trainer.limit_val_batches=2",
                      "stage.module.sample_steps=2", "stage.module.scale_factor_batches=2", "callbacks.evaluation.n_images=4",
                      "callbacks.evaluation.steps=2", "callbacks.evaluation.metrics=[fid]",
                      f"callbacks.evaluation.feature_cache={tmp_path / 'features'}")
    metrics = train(cfg)
    assert "val/loss" in metrics
    history = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert [entry["step"] for entry in history] == [2] and history[0]["fid"] > 0
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["state_dict"]["unet.label_emb.weight"].shape[0] == 12  # 11 groups and the null class


# --- the callbacks group ----------------------------------------------------------------------------

DEFAULT_CALLBACKS = [PerRankSeed, SameRunOnAllRanks, ImageLogger, DataCountsLogger, LearningRateMonitor,
                     StopOnSignal, ModelCheckpoint, LastCheckpoint]


def _callbacks(tmp_path: Path, *overrides: str, stage: list[str] = TINY_AUTOENCODER) -> list:
    return build_trainer(compose_config(str(tmp_path), [*stage, *overrides]), tmp_path).callbacks


def test_the_default_callbacks_are_those_built_before_the_group(tmp_path: Path) -> None:
    callbacks = _callbacks(tmp_path)
    # Lightning runs Checkpoint callbacks last: the "best" checkpoint, then last.ckpt (whose state includes it).
    assert [type(c) for c in callbacks] == DEFAULT_CALLBACKS
    best = callbacks[-2]
    assert (best.dirpath, best.filename, best.monitor, best.mode, best.save_top_k, best.save_last) == (
        str(tmp_path / "checkpoints"), "best-{step}", "val/psnr", "max", 1, False)
    assert callbacks[-1].path == tmp_path / "checkpoints" / "last.ckpt"
    assert callbacks[2].dirpath == tmp_path / "images"
    assert callbacks[4].logging_interval == "step"
    ldm_best = next(c for c in _callbacks(tmp_path, stage=TINY_LDM) if isinstance(c, ModelCheckpoint))
    assert (ldm_best.monitor, ldm_best.mode) == ("val/loss", "min")


def test_a_progress_bar_only_when_enabled_and_an_lr_monitor_only_with_a_logger(tmp_path: Path) -> None:
    with_bar = _callbacks(tmp_path, "trainer.enable_progress_bar=true")
    bar = next(c for c in with_bar if isinstance(c, TQDMProgressBar))
    assert bar.refresh_rate == 10 and [type(c) for c in with_bar if not isinstance(c, TQDMProgressBar)] == DEFAULT_CALLBACKS
    assert not any(isinstance(c, LearningRateMonitor) for c in _callbacks(tmp_path, "~logger"))


@pytest.mark.parametrize("drop", ["~callbacks.image_logger", "callbacks.image_logger=null"])
def test_a_callback_is_dropped_from_the_command_line(tmp_path: Path, drop: str) -> None:
    assert [type(c) for c in _callbacks(tmp_path, drop)] == [t for t in DEFAULT_CALLBACKS if t is not ImageLogger]


def test_callbacks_none_keeps_only_the_built_in_machinery(tmp_path: Path) -> None:
    assert [type(c) for c in _callbacks(tmp_path, "callbacks=none")] == [PerRankSeed, SameRunOnAllRanks, StopOnSignal, LastCheckpoint]


def test_a_callback_is_added_from_the_command_line(tmp_path: Path) -> None:
    callbacks = _callbacks(tmp_path, "+callbacks.timer._target_=lightning.pytorch.callbacks.Timer",
                           "+callbacks.timer.duration=00:01:00:00")
    timer = next(c for c in callbacks if isinstance(c, Timer))
    assert timer._duration == 3600 and isinstance(callbacks[-1], LastCheckpoint)


def test_under_slurm_the_requeue_callback_comes_before_last_ckpt(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run.SLURMEnvironment, "detect", staticmethod(lambda: True))
    callbacks = _callbacks(tmp_path)
    requeue = next(c for c in callbacks if isinstance(c, RequeueOnSignal))
    assert requeue.last_checkpoint is callbacks[-1] and callbacks.index(requeue) < len(callbacks) - 2
    assert [c for c in callbacks if isinstance(c, StopOnSignal)] == [requeue]  # it handles SIGTERM and SIGINT too


@pytest.mark.parametrize(("override", "match"), [
    ("+callbacks.image_logger.dirpaht=x", r"Could not build `callbacks.image_logger` .*dirpaht"),
    ("+callbacks.mine._target_=collections.OrderedDict", r"`callbacks.mine` \(collections.OrderedDict\) is not a Lightning Callback"),
    ("+callbacks.mine=5", r"`callbacks.mine` must be a config with a `_target_`"),
    ("+callbacks.mine._target_=no.such.Callback", r"Could not build `callbacks.mine` from the config \(no.such.Callback\): .*No module named"),
])
def test_a_wrong_callback_config_fails_with_one_line_naming_the_group(tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as failure:
        _callbacks(tmp_path, override)
    assert "\n" not in str(failure.value)
    assert ConfigError is LdmConfigError
