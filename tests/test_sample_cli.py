"""`python sample.py` end to end on the tiny stage-2 checkpoint, and its errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.diffusion.schedule import NoiseSchedule
from ldm.errors import SamplingInputError
from ldm.inference.sample import plan_jobs, read_prompts, sample, sampler_from_config

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle in the center on a white background"
NEGATIVE = "a blue square"
COMMON = [f"prompt={PROMPT}", "steps=4", "H=32", "W=32"]


def sample_cli(*overrides: str) -> subprocess.Popen:
    """Starts `python sample.py` (one intra-op thread, as the machine is shared) without waiting."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "sample.py", "progress=false", *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def compose_sample_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))


def sample_in_process(*overrides: str) -> list[Path]:
    """`sample(cfg)` on the composed sample.yaml, with one intra-op thread as in the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sample(compose_sample_config("progress=false", *overrides))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cli(tiny_ldm_ckpt, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The command lines of this file, run side by side (each one mostly waits on imports)."""
    root = tmp_path_factory.mktemp("samples")
    command_lines = {
        "first": [f"ckpt={tiny_ldm_ckpt}", *COMMON, f"negative_prompt={NEGATIVE}", "seed=3", "n_samples=2", "batch_size=2"],
        "missing": [f"ckpt={root / 'nope.ckpt'}", *COMMON],
        "nope": [f"ckpt={tiny_ldm_ckpt}", *COMMON, "sampler=nope"],
    }
    started = {name: (sample_cli(*args, f"out_dir={root / name}"), root / name) for name, args in command_lines.items()}
    results = {}
    for name, (process, out_dir) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), out_dir)
    return results


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_writes_one_png_per_image_and_a_grid(cli):
    result, out_dir = cli["first"]
    assert result.returncode == 0, result.stderr
    images = sorted(out_dir.glob("0*.png"))
    assert [p.name for p in images] == ["00000-seed3.png", "00001-seed4.png"]
    assert Image.open(images[0]).size == (32, 32)
    grid = pixels(out_dir / "grid.png")
    assert grid.shape == (36, 70, 3)
    assert np.array_equal(grid[2:34, 2:34], pixels(images[0])) and np.array_equal(grid[2:34, 36:68], pixels(images[1]))


def test_png_text_chunks_carry_the_settings(cli, tiny_ldm_ckpt):
    _, out_dir = cli["first"]
    text = Image.open(out_dir / "00001-seed4.png").text
    assert text["prompt"] == PROMPT
    assert text["negative_prompt"] == NEGATIVE
    assert text["seed"] == "4"
    assert text["sampler"] == "ddim"
    assert text["steps"] == "4"
    assert text["guidance_scale"] == "5.0"
    assert text["guidance_rescale"] == "0.0"
    assert text["guidance_interval"] == "null"
    assert json.loads(text["sampler_options"])["spacing"] == "trailing"  # the tiny model's zero-terminal-SNR default
    assert text["checkpoint"] == str(Path(tiny_ldm_ckpt).resolve())
    assert text["prediction"] == "v"
    assert float(text["scale_factor"]) == pytest.approx(float(torch.load(tiny_ldm_ckpt, weights_only=True)["state_dict"]["scale_factor"]))


def test_same_seed_gives_the_same_bytes_and_image_k_uses_seed_plus_k(cli, tiny_ldm_ckpt, tmp_path):
    _, first = cli["first"]
    args = [f"ckpt={tiny_ldm_ckpt}", *COMMON, f"negative_prompt={NEGATIVE}"]
    sample_in_process(*args, "seed=3", "n_samples=2", "batch_size=2", f"out_dir={tmp_path / 'again'}")
    for name in ("00000-seed3.png", "00001-seed4.png", "grid.png"):
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    sample_in_process(*args, "seed=4", "n_samples=1", f"out_dir={tmp_path / 'next'}")
    alone = pixels(tmp_path / "next" / "00000-seed4.png")
    # Same seed in a batch of 2 and alone: equal up to float rounding in the batched convolutions.
    assert np.abs(alone - pixels(first / "00001-seed4.png")).max() <= 1
    # Another seed differs beyond that rounding everywhere it matters (the few-step fixture model's
    # decoder varies little with its latents, so the margin is small but not rounding).
    other = np.abs(alone - pixels(first / "00000-seed3.png"))
    assert other.max() > 1 and other.mean() > 0.5


@pytest.mark.parametrize(
    "run, message",
    [
        ("missing", r"^error: ckpt=.*nope\.ckpt does not exist"),
        ("nope", r"Could not find 'sampler/nope'[\s\S]*Available options in 'sampler':\s+ddim\s+ddpm\s+dpmpp_2m\s+euler\s+euler_a"),
    ],
)
def test_bad_input_exits_with_a_message_and_no_traceback(cli, run, message):
    result, out_dir = cli[run]
    assert result.returncode != 0
    assert re.search(message, result.stderr, re.MULTILINE), result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out_dir.glob("*.png"))


def test_a_guidance_interval_is_used_and_recorded(tiny_ldm_ckpt, tmp_path, monkeypatch):
    import ldm.inference.sample

    intervals = []
    real = ldm.inference.sample.generate_images

    def spy(*args, **kwargs):
        intervals.append(kwargs["guidance_interval"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ldm.inference.sample, "generate_images", spy)
    (path,) = sample_in_process(f"ckpt={tiny_ldm_ckpt}", *COMMON, "seed=3", "n_samples=1", "guidance_interval=[0,400]", f"out_dir={tmp_path}")
    assert intervals == [(0.0, 400.0)]
    assert json.loads(Image.open(path).text["guidance_interval"]) == [0.0, 400.0]


def test_stage_1_checkpoint_and_bad_sizes_are_refused(tiny_ldm_ckpt, tiny_autoencoder_ckpt, tmp_path):
    with pytest.raises(SamplingInputError, match=r"is a 'autoencoder' checkpoint, not a stage-2 \(ldm\) one"):
        sample_in_process(f"ckpt={tiny_autoencoder_ckpt}", *COMMON, f"out_dir={tmp_path}")
    with pytest.raises(SamplingInputError, match=r"H=31: image height and width must be positive multiples of 2"):
        sample_in_process(f"ckpt={tiny_ldm_ckpt}", f"prompt={PROMPT}", "H=31", "W=32", f"out_dir={tmp_path}")
    with pytest.raises(SamplingInputError, match=r"mask=PATH needs init_image=PATH"):
        sample_in_process(f"ckpt={tiny_ldm_ckpt}", *COMMON, "mask=mask.png", f"out_dir={tmp_path}")
    with pytest.raises(SamplingInputError, match=r"guidance_rescale=1.5: guidance rescale must be in \[0, 1\]"):
        sample_in_process(f"ckpt={tiny_ldm_ckpt}", *COMMON, "guidance_rescale=1.5", f"out_dir={tmp_path}")
    with pytest.raises(SamplingInputError, match=r"guidance_interval=\[500, 400\]: guidance interval must be \(lo, hi\) timesteps with 0 <= lo <= hi"):
        sample_in_process(f"ckpt={tiny_ldm_ckpt}", *COMMON, "guidance_interval=[500,400]", f"out_dir={tmp_path}")
    with pytest.raises(SamplingInputError, match=r"guidance_interval=\[1, 2, 3\]: guidance interval must be two timesteps"):
        sample_in_process(f"ckpt={tiny_ldm_ckpt}", *COMMON, "guidance_interval=[1,2,3]", f"out_dir={tmp_path}")
    assert not list(tmp_path.glob("*.png"))


def test_sampler_shortcuts_apply_to_the_chosen_sampler():
    schedule = NoiseSchedule(kind="scaled_linear", beta_start=0.00085, beta_end=0.012)
    cfg = compose_sample_config("sampler=dpmpp_2m", "steps=7", "karras=true")
    sampler, options = sampler_from_config(cfg.sampler, schedule, {"steps": cfg.steps, "karras": cfg.karras, "eta": None})
    assert (sampler.name, sampler.steps, sampler.karras) == ("dpmpp_2m", 7, True)
    assert options["karras"] is True
    cfg = compose_sample_config("sampler=ddim", "sampler.eta=1")
    assert sampler_from_config(cfg.sampler, schedule, {})[0].eta == 1.0
    with pytest.raises(SamplingInputError, match=r"eta=0.5 does not apply to sampler=euler \(its options: karras"):
        sampler_from_config(compose_sample_config("sampler=euler").sampler, schedule, {"eta": 0.5})
    with pytest.raises(SamplingInputError, match=r"sampler=ddim: steps must be in \[1, 1000\]"):
        sampler_from_config(compose_sample_config().sampler, schedule, {"steps": 5000})


def test_prompts_come_from_one_place_and_images_get_seed_plus_index(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n\n  a blue square  \n")
    assert read_prompts(None, str(prompts_file)) == ["a red circle", "a blue square"]
    with pytest.raises(SamplingInputError, match="exactly one of"):
        read_prompts("x", str(prompts_file))
    with pytest.raises(SamplingInputError, match="exactly one of"):
        read_prompts(None, None)
    jobs = plan_jobs(["a", "b"], n_samples=2, seed=10)
    assert [(j.index, j.prompt, j.seed) for j in jobs] == [(0, "a", 10), (1, "a", 11), (2, "b", 12), (3, "b", 13)]
