"""benchmarks/prompt_following.py: captions drawn as asked, every number in place, and the detector
reads clean shapes (the checkpoints are trained a few steps only, so generation accuracies are not judged)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.shapes import DEFAULT_HOLDOUT

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prompt_following.py"
COLUMNS = ("colour", "shape", "size", "position", "background", "all")


def load_script():
    spec = importlib.util.spec_from_file_location("prompt_following", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prompt_following = load_script()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_accuracies(accuracies: dict[str, float]) -> None:
    assert set(accuracies) == set(COLUMNS)
    assert all(0.0 <= value <= 1.0 for value in accuracies.values()), accuracies


def test_cases_split_between_held_out_and_seen_pairs() -> None:
    cases = prompt_following.draw_cases(40, seed=3, holdout_fraction=0.25)
    held_out = [case for case in cases if case.held_out]
    assert len(cases) == 40 and len(held_out) == 10
    assert all((case.attributes["colour"], case.attributes["shape"]) in DEFAULT_HOLDOUT for case in held_out)
    assert not any((case.attributes["colour"], case.attributes["shape"]) in DEFAULT_HOLDOUT for case in cases if not case.held_out)
    assert [case.seed for case in cases] == list(range(3, 43))
    assert any(case.held_out for case in cases[:20]), "held-out cases should be shuffled in, not all at the end"
    assert cases == prompt_following.draw_cases(40, seed=3, holdout_fraction=0.25)
    assert cases != prompt_following.draw_cases(40, seed=4, holdout_fraction=0.25)
    assert len({case.prompt for case in cases}) > 30


def test_binomial_half_width() -> None:
    assert prompt_following.binomial_half_width(0.5, 100) == pytest.approx(0.098)
    assert prompt_following.binomial_half_width(1.0, 100) == 0.0


def test_generate_mode_scores_every_prompt(tiny_ldm_ckpt: str, tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.png"
    result = prompt_following.main(
        ["generate", "--ckpt", tiny_ldm_ckpt, "--n", "6", "--steps", "2", "--guidance", "1", "3", "--batch-size", "4",
         "--holdout-fraction", "0.5", "--device", "cpu", "--grid", str(grid), "--no-progress", "--guidance-interval", "0", "400"]
    )  # fmt: skip
    assert result["training_steps"] == 10
    assert result["guidance_interval"] == [0.0, 400.0]
    assert (result["n"], result["n_seen"], result["n_held_out"]) == (6, 3, 3)
    assert set(result["guidance"]) == {"1", "3"}
    for entry in result["guidance"].values():
        for subset in ("seen", "held_out", "overall"):
            assert_accuracies(entry[subset])
        assert all(0.0 <= value <= 0.5 for value in entry["overall_half_width"].values())
        assert entry["sampling_seconds"] > 0
    assert result["chance"]["all"] == pytest.approx(1 / (8 * 3 * 2 * 9 * 4))
    assert Image.open(grid).size[1] > 2 * 32, "one block of rows per guidance scale"

    output = capsys.readouterr().out.strip().splitlines()
    assert json.loads(output[-1]) == json.loads(json.dumps(result))
    assert any(line.startswith("chance") for line in output)
    assert any("guidance interval t in [0, 400]" in line for line in output)


def test_sampling_is_per_prompt_seeded(tiny_ldm_ckpt: str) -> None:
    """Image k depends on its prompt and seed only, not on how the cases are batched."""
    model = prompt_following.load_model(tiny_ldm_ckpt, torch.device("cpu"))
    sampler = prompt_following.build_sampler("ddim", model.schedule, 2, prediction=model.hparams.prediction)
    cases = prompt_following.draw_cases(3, seed=0, holdout_fraction=0.0)
    together = prompt_following.sample_cases(model, sampler, cases, 3.0, 32, batch_size=3)
    one_by_one = prompt_following.sample_cases(model, sampler, cases, 3.0, 32, batch_size=1)
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=0)
    assert together.shape == (3, 3, 32, 32)
    assert together.std(dim=0).mean() > 1e-3, "different seeds should give different images"


def test_detector_mode_reads_clean_shapes(tiny_autoencoder_ckpt: str, capsys) -> None:
    result = prompt_following.main(["detector", "--autoencoder-ckpt", tiny_autoencoder_ckpt, "--n", "64", "--device", "cpu"])
    assert result["clean"]["colour"] >= 0.98 and result["clean"]["shape"] >= 0.98, result["clean"]
    assert_accuracies(result["clean"])
    assert_accuracies(result["reconstruction"])
    assert math.isfinite(result["psnr"]) and result["psnr"] > 5.0
    assert result["training_steps"] == 30
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["psnr"] == pytest.approx(result["psnr"])


def test_no_ema_samples_with_the_trained_weights(tiny_ldm_ckpt: str) -> None:
    """`--no-ema` must reach the pipeline: the tiny run's EMA differs from its weights, so do the images."""
    model = prompt_following.load_model(tiny_ldm_ckpt, torch.device("cpu"))
    sampler = prompt_following.build_sampler("ddim", model.schedule, 2, prediction=model.hparams.prediction)
    cases = prompt_following.draw_cases(2, seed=0, holdout_fraction=0.0)
    ema = prompt_following.sample_cases(model, sampler, cases, 3.0, 32, batch_size=2)
    raw = prompt_following.sample_cases(model, sampler, cases, 3.0, 32, batch_size=2, use_ema=False)
    assert (ema - raw).abs().max() > 1e-3
    with torch.no_grad():
        model.ema.copy_to(model.unet)
    assert torch.equal(prompt_following.sample_cases(model, sampler, cases, 3.0, 32, batch_size=2, use_ema=False), ema)
