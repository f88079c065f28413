"""`compile=true` in sample.yaml: the UNet under torch.compile for sampling (CUDA graphs on a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.diffusion.samplers import DDIMSampler, DPMSolverMultistepSampler
from ldm.inference import generate_images, load_model
from ldm.inference.compiled import CompiledUNet, compile_for_sampling
from test_sample_cli import COMMON, compose_sample_config, sample_in_process


def test_sample_yaml_has_compile_off_with_cuda_graphs_as_its_mode() -> None:
    cfg = compose_sample_config()
    assert cfg.compile is False
    assert cfg.compile_kwargs.mode == "reduce-overhead"


def test_the_compiled_unet_holds_the_same_weights_and_builds_nothing_before_its_first_call(tiny_ldm_ckpt: str) -> None:
    model = load_model(tiny_ldm_ckpt, "cpu", use_ema=True)
    weights = list(model.unet.parameters())
    compiled = compile_for_sampling(model, backend="inductor", mode="reduce-overhead").unet
    assert isinstance(compiled, CompiledUNet) and compiled.graphs
    assert all(a is b for a, b in zip(compiled.parameters(), weights, strict=True))
    assert not CompiledUNet(torch.nn.Identity(), backend="eager").graphs


def test_compiled_sampling_gives_the_eager_images(tiny_ldm_ckpt: str) -> None:
    """Dynamo's eager backend: the whole path (graph steps, copies of the output) without inductor's compile time.
    DPM-Solver++ keeps the previous step's x_0 across the next UNet call."""
    model = load_model(tiny_ldm_ckpt, "cpu", use_ema=True)
    sampler = DPMSolverMultistepSampler(model.schedule, 3)
    kwargs = dict(height=32, width=32, guidance_scale=3.0)
    eager = generate_images(model, sampler, ["a red circle"], [0], **kwargs)
    compile_for_sampling(model, backend="eager", mode="reduce-overhead")
    compiled = generate_images(model, sampler, ["a red circle"], [0], **kwargs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sample_py_with_compile_true_writes_the_eager_images(tiny_ldm_ckpt: str, tmp_path: Path) -> None:
    """inductor on the CPU (no CUDA graphs here): minutes of compiling."""
    common = [f"ckpt={tiny_ldm_ckpt}", *COMMON, "seed=1", "n_samples=1", "batch_size=1", "sampler=ddim"]
    (eager,) = sample_in_process(*common, f"out_dir={tmp_path / 'eager'}")
    (compiled,) = sample_in_process(*common, "compile=true", f"out_dir={tmp_path / 'compiled'}")
    difference = np.abs(np.asarray(Image.open(eager), dtype=int) - np.asarray(Image.open(compiled), dtype=int))
    assert difference.max() <= 1
    assert DDIMSampler  # the sampler of this run
