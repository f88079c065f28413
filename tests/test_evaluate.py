"""`python evaluate.py` on tiny checkpoints of both stages, on shapes and emoji, with a few images."""

import json
import math
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from ldm.errors import CheckpointStageError, EvaluationError
from ldm.evaluation.evaluate import evaluate

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def evaluate_config(tmp_path, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="evaluate", overrides=[
            f"out_dir={tmp_path / 'out'}", f"metrics.feature_cache={tmp_path / 'cache'}", "progress=false", "batch_size=4",
            "device=cpu", *overrides,
        ])  # fmt: skip


def test_stage1_on_shapes(tmp_path, tiny_autoencoder_ckpt):
    result = evaluate(evaluate_config(tmp_path, [f"ckpt={tiny_autoencoder_ckpt}", "n_images=6", "metrics.lpips=stlpips_vgg"]))
    metrics = result["metrics"]
    assert result["stage"] == "autoencoder" and result["n_images"] == 6 and result["image_size"] == 32
    for name in ("psnr", "ssim", "lpips", "rfid"):
        assert math.isfinite(metrics[name]), name
    assert 5 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1 and metrics["lpips"] >= 0 and metrics["rfid"] >= 0
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["metrics"]["psnr"] == metrics["psnr"]
    table = (out / "metrics.md").read_text()
    assert "| PSNR (dB) |" in table and "stlpips_vgg" in table
    assert (out / "reconstructions.png").is_file()


def test_stage1_on_emoji_with_chosen_metrics(tmp_path, tiny_autoencoder_ckpt):
    result = evaluate(evaluate_config(tmp_path, [f"ckpt={tiny_autoencoder_ckpt}", "data=emoji", "n_images=4", "metrics.names=[psnr,ssim]"]))
    assert set(result["metrics"]) == {"psnr", "psnr_std", "ssim", "ssim_std"} and "inception" not in result
    assert result["data"]["_target_"] == "ldm.data.emoji.EmojiDataset"


def test_stage2_on_shapes_and_the_reference_cache(tmp_path, tiny_ldm_ckpt):
    overrides = [f"ckpt={tiny_ldm_ckpt}", "n_images=5", "steps=2", "guidance_scale=2"]
    result = evaluate(evaluate_config(tmp_path, overrides))
    metrics = result["metrics"]
    assert result["stage"] == "ldm" and result["sampler"] == "ddim" and result["steps"] == 2
    assert metrics["fid"] > 0 and math.isfinite(metrics["kid"]) and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["is"] is None and "IS" in metrics["notes"][0]  # the bundled TorchScript has no classifier
    assert not result["inception"]["reference_features_cached"]
    assert (tmp_path / "out" / "samples.png").is_file()
    again = evaluate(evaluate_config(tmp_path, overrides))
    assert again["inception"]["reference_features_cached"] and again["metrics"]["fid"] == pytest.approx(metrics["fid"])


def test_stage2_on_emoji_from_the_command_line(tmp_path, tiny_ldm_ckpt, repo_root):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red apple\ngrinning face\n")
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"ckpt={tiny_ldm_ckpt}", "data=emoji", "n_images=4", "batch_size=4", "steps=2",
         f"prompts_file={prompts}", "metrics.names=[fid,kid,precision,recall]", f"metrics.feature_cache={tmp_path / 'cache'}",
         f"out_dir={out}", "device=cpu", "progress=false", "sampler=euler"],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    assert result["sampler"] == "euler" and result["prompts"] == str(prompts)
    assert set(result["metrics"]) == {"fid", "kid", "kid_std", "precision", "recall"}
    assert "| FID |" in (out / "metrics.md").read_text()


def test_user_errors_are_one_line(tmp_path, tiny_autoencoder_ckpt, repo_root):
    with pytest.raises(EvaluationError, match="ckpt="):
        evaluate(evaluate_config(tmp_path, []))
    with pytest.raises(EvaluationError, match="do not apply to a autoencoder"):
        evaluate(evaluate_config(tmp_path, [f"ckpt={tiny_autoencoder_ckpt}", "metrics.names=[fid]"]))
    not_ours = tmp_path / "weights.pt"
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1)}}, not_ours)
    with pytest.raises(CheckpointStageError, match="not a checkpoint written by ldm's train.py"):
        evaluate(evaluate_config(tmp_path, [f"ckpt={not_ours}"]))
    proc = subprocess.run([sys.executable, "evaluate.py", f"ckpt={tmp_path / 'missing.ckpt'}", f"out_dir={tmp_path / 'o'}"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [f"error: ckpt={tmp_path / 'missing.ckpt'} does not exist."]


def _train(tmp_path, overrides):
    from ldm.training.run import train
    from train_helpers import compose_config

    run_dir = tmp_path / "run"
    train(compose_config(str(run_dir), overrides))
    return run_dir


def test_evaluation_callback_in_stage1_logs_curves_and_plots_them(tmp_path):
    from train_helpers import TINY_AUTOENCODER

    run_dir = _train(tmp_path, [*TINY_AUTOENCODER, "trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks=with_eval",
                                "callbacks.evaluation.every_n_steps=2", "callbacks.evaluation.n_images=4",
                                "callbacks.evaluation.metrics=[psnr,ssim,rfid,fid]", f"callbacks.evaluation.feature_cache={tmp_path / 'cache'}"])
    history = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert [entry["step"] for entry in history] == [2, 4]
    assert all({"psnr", "ssim", "rfid"} <= set(entry) and "fid" not in entry for entry in history)
    assert (run_dir / "evaluation" / "metrics.png").stat().st_size > 1000
    csv = next(run_dir.rglob("metrics.csv")).read_text().splitlines()[0]
    assert "eval/psnr" in csv and "eval/rfid" in csv


def test_evaluation_callback_in_stage2(tmp_path, tiny_autoencoder_ckpt):
    from train_helpers import TINY_LDM

    run_dir = _train(tmp_path, [*TINY_LDM, f"autoencoder_ckpt={tiny_autoencoder_ckpt}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                "callbacks=with_eval", "callbacks.evaluation.every_n_steps=2", "callbacks.evaluation.n_images=4",
                                "callbacks.evaluation.steps=2", "callbacks.evaluation.metrics=[fid,kid,precision]",
                                f"callbacks.evaluation.feature_cache={tmp_path / 'cache'}"])
    history = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert [entry["step"] for entry in history] == [2] and {"fid", "kid", "precision"} <= set(history[0])
    assert (run_dir / "evaluation" / "metrics.png").is_file()


def test_the_smoke_defaults_have_no_evaluation_callback():
    from train_helpers import compose_config

    assert "evaluation" not in compose_config("/tmp/unused", []).callbacks


def test_stage1_on_real_photos(tmp_path, tiny_autoencoder_ckpt):
    pytest.importorskip("skimage")
    result = evaluate(evaluate_config(tmp_path, [f"ckpt={tiny_autoencoder_ckpt}", "data=photos", "n_images=200", "metrics.names=[psnr,ssim]"]))
    assert result["n_images"] == 136 and result["data"]["_target_"] == "ldm.data.photos.PhotosDataset"  # 17 photos x (centre + 7 crops)
    assert math.isfinite(result["metrics"]["psnr"])
