"""ldm.evaluation.prompt_following and its command line, benchmarks/prompt_following.py: captions drawn as
asked, every number in place, and the detector reads clean shapes (the checkpoints are trained a few steps
only, so generation accuracies are not judged)."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.shapes import DEFAULT_HOLDOUT
from ldm.diffusion import build_sampler
from ldm.evaluation import prompt_following

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prompt_following.py"
COLUMNS = ("colour", "shape", "size", "position", "background", "all")


@pytest.fixture(scope="module")
def cli_main():
    """The script's `main`, run in-process (the script is not a package module)."""
    return runpy.run_path(str(SCRIPT), run_name="prompt_following_cli")["main"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_accuracies(accuracies: dict[str, float]) -> None:
    assert set(accuracies) == set(COLUMNS)
    assert all(0.0 <= value <= 1.0 for value in accuracies.values()), accuracies


def test_the_library_imports_no_lightning_and_no_training_code(repo_root: str) -> None:
    script = (
        "import sys, ldm.evaluation.prompt_following\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') or m.startswith('ldm.training'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


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


def test_generate_mode_scores_every_prompt(cli_main, tiny_ldm_ckpt: str, tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.png"
    result = cli_main(
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
    model = prompt_following.load_for_evaluation(tiny_ldm_ckpt, torch.device("cpu"))
    sampler = build_sampler("ddim", model.schedule, 2)
    cases = prompt_following.draw_cases(3, seed=0, holdout_fraction=0.0)
    together = prompt_following.sample_cases(model, sampler, cases, 3.0, 32, batch_size=3)
    one_by_one = prompt_following.sample_cases(model, sampler, cases, 3.0, 32, batch_size=1)
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=0)
    assert together.shape == (3, 3, 32, 32)
    assert together.std(dim=0).mean() > 1e-3, "different seeds should give different images"


def test_detector_mode_reads_clean_shapes(cli_main, tiny_autoencoder_ckpt: str, capsys) -> None:
    result = cli_main(["detector", "--autoencoder-ckpt", tiny_autoencoder_ckpt, "--n", "64", "--device", "cpu"])
    assert result["clean"]["colour"] >= 0.98 and result["clean"]["shape"] >= 0.98, result["clean"]
    assert_accuracies(result["clean"])
    assert_accuracies(result["reconstruction"])
    assert math.isfinite(result["psnr"]) and result["psnr"] > 5.0
    assert result["training_steps"] == 30
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["psnr"] == pytest.approx(result["psnr"])


def test_no_ema_samples_with_the_trained_weights(tiny_ldm_ckpt: str) -> None:
    """`use_ema=False` must reach the model: the tiny run's EMA differs from its weights, so do the images,
    and the trained-weights model given the EMA's weights draws the EMA's images."""
    ema_model = prompt_following.load_for_evaluation(tiny_ldm_ckpt, torch.device("cpu"))
    raw_model = prompt_following.load_for_evaluation(tiny_ldm_ckpt, torch.device("cpu"), use_ema=False)
    sampler = build_sampler("ddim", ema_model.schedule, 2)
    cases = prompt_following.draw_cases(2, seed=0, holdout_fraction=0.0)
    ema = prompt_following.sample_cases(ema_model, sampler, cases, 3.0, 32, batch_size=2)
    raw = prompt_following.sample_cases(raw_model, sampler, cases, 3.0, 32, batch_size=2)
    assert (ema - raw).abs().max() > 1e-3
    raw_model.unet.load_state_dict(ema_model.unet.state_dict())
    assert torch.equal(prompt_following.sample_cases(raw_model, sampler, cases, 3.0, 32, batch_size=2), ema)


def test_no_ema_reaches_the_generation_benchmark(tiny_ldm_ckpt: str) -> None:
    """`--no-ema` -> `evaluate_generation(use_ema=False)` scores the trained weights and says so."""
    kwargs = {"n": 2, "steps": 1, "guidance_scales": (1.0,), "device": "cpu", "progress": False}
    result = prompt_following.evaluate_generation(tiny_ldm_ckpt, use_ema=False, **kwargs)
    assert result["weights"] == "raw"
    assert "raw weights" in prompt_following.generation_report(result).splitlines()[0]
