"""Stage 1 end to end through the real configs: training, GAN switch-on, resume, config errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from ldm.checkpoints import CheckpointStageError, load_autoencoder
from ldm.training.autoencoder_module import AutoencoderModule, optimizer_steps_for
from ldm.training.run import ConfigError, train
from train_helpers import TINY_AUTOENCODER, compose_config


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_optimizer_steps_for_counts_generator_steps() -> None:
    assert optimizer_steps_for(100, disc_start=1000) == 100
    assert optimizer_steps_for(100, disc_start=60) == 140
    assert optimizer_steps_for(100, disc_start=0) == 200


def test_tiny_autoencoder_loss_falls_and_leaves_artifacts(tmp_path: Path) -> None:
    cfg = compose_config(str(tmp_path), [*TINY_AUTOENCODER, "trainer.max_steps=80", "trainer.val_check_interval=40",
                                         "stage.module.optimizer.lr=2e-3"])
    metrics = train(cfg)
    rec = _column(_metrics(tmp_path), "train/rec")
    assert len(rec) >= 30
    assert sum(rec[-5:]) / 5 < 0.7 * sum(rec[:5]) / 5
    psnr = _column(_metrics(tmp_path), "val/psnr")
    assert len(psnr) == 2 and psnr[1] > psnr[0] + 0.5 and metrics["val/psnr"] == pytest.approx(psnr[1], abs=1e-3)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "images").glob("reconstructions_step*.png"))
    resolved = (tmp_path / "config.yaml").read_text()
    assert "ldm.modules.autoencoder.KLAutoencoder" in resolved and "${" not in resolved
    # The checkpoint alone rebuilds the autoencoder (no YAML needed) with the trained weights.
    autoencoder = load_autoencoder(tmp_path / "checkpoints" / "last.ckpt")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert torch.equal(autoencoder.decoder.conv_out.weight, ckpt["state_dict"]["autoencoder.decoder.conv_out.weight"])


def test_discriminator_switches_on_at_disc_start_counted_in_generator_steps(tmp_path: Path) -> None:
    cfg = compose_config(str(tmp_path), [*TINY_AUTOENCODER, "trainer.max_steps=10", "loss.disc_start=6",
                                         "trainer.val_check_interval=10"])
    train(cfg)
    rows = [r for r in _metrics(tmp_path) if r.get("train/generator_step")]
    steps = _column(rows, "train/generator_step")
    assert steps == [float(s) for s in range(1, 11)], "max_steps must count autoencoder steps, not optimizer steps"
    d_weight = _column(rows, "train/d_weight")
    assert all(w == 0.0 for w in d_weight[:6]) and all(w > 0.0 for w in d_weight[6:])
    disc_loss = [r.get("train/disc_loss") for r in rows]
    assert not any(disc_loss[:6]) and all(disc_loss[6:])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["generator_step"] == 10
    ae_state, d_state = ckpt["optimizer_states"]
    assert next(iter(ae_state["state"].values()))["step"] == 10
    assert next(iter(d_state["state"].values()))["step"] == 4


def test_resume_continues_from_the_saved_step(tmp_path: Path) -> None:
    first = tmp_path / "first"
    train(compose_config(str(first), [*TINY_AUTOENCODER, "trainer.max_steps=6", "loss.disc_start=4", "trainer.val_check_interval=6"]))
    last = first / "checkpoints" / "last.ckpt"
    second = tmp_path / "second"
    train(compose_config(str(second), [*TINY_AUTOENCODER, "trainer.max_steps=9", "loss.disc_start=4",
                                       "trainer.val_check_interval=9", f"ckpt_path={last}"]))
    steps = _column(_metrics(second), "train/generator_step")
    assert steps == [7.0, 8.0, 9.0]
    ckpt = torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["generator_step"] == 9
    assert next(iter(ckpt["optimizer_states"][1]["state"].values()))["step"] == 5  # D stepped at gen steps 4..8


def test_misspelled_key_on_the_command_line_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(str(tmp_path), ["model.chanels=3"])
    assert "chanels" in str(err.value.__cause__ or err.value)


def test_misspelled_key_in_a_config_names_it(tmp_path: Path) -> None:
    cfg = compose_config(str(tmp_path), [*TINY_AUTOENCODER, "+model.chanels=3"])
    with pytest.raises(ConfigError, match="chanels"):
        train(cfg)


def test_resuming_from_a_checkpoint_of_the_other_stage_fails_clearly(tmp_path: Path) -> None:
    fake = tmp_path / "ldm.ckpt"
    torch.save({"ldm_stage": "ldm", "state_dict": {}, "hyper_parameters": {"stage": "ldm"}}, fake)
    with pytest.raises(CheckpointStageError, match="'ldm' checkpoint"):
        load_autoencoder(fake)
    module = AutoencoderModule.__new__(AutoencoderModule)
    with pytest.raises(ValueError, match="autoencoder"):
        AutoencoderModule.on_load_checkpoint(module, {"ldm_stage": "ldm"})
