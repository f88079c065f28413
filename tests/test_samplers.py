"""Samplers, step by step against diffusers' schedulers; img2img, inpainting and guidance on toy models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from torch import Tensor

from ldm.diffusion import ClassifierFreeGuidance, Denoiser, NoiseSchedule, build_sampler, timesteps_for
from ldm.diffusion.samplers import SAMPLERS, karras_sigmas

SHAPE = (2, 4, 8, 8)
SD_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


_ALPHA_BAR = NoiseSchedule().alphas_cumprod_f64


def toy_model(x: Tensor, t: Tensor) -> Tensor:
    """A deterministic stand-in for a denoiser: the ideal ε-predictor for unit-Gaussian data,
    sqrt(1 - ᾱ_t) x_t, plus a nonlinear term that mixes pixels and a t-dependent offset."""
    t = t.double()
    low = t.floor().clamp(0, 998)
    alpha_bar = torch.lerp(_ALPHA_BAR[low.long()], _ALPHA_BAR[low.long() + 1], t - low).float().view(-1, 1, 1, 1)
    offset = 0.05 * torch.cos(t.float() / 150.0).view(-1, 1, 1, 1)
    return (1 - alpha_bar).sqrt() * x + 0.1 * torch.tanh(x.roll(3, dims=-1)) + offset


def our_trajectory(sampler, x_T: Tensor, seed: int, prediction: str = "eps", **kwargs) -> list[Tensor]:
    states = []
    sampler.sample(Denoiser(toy_model, prediction), x_T, generator=torch.Generator().manual_seed(seed), callback=lambda i, x: states.append(x), progress=False, **kwargs)
    return states


def diffusers_trajectory(scheduler, steps: int | None, x_T: Tensor, seed: int, sigma_state: bool = False, **step_kwargs) -> list[Tensor]:
    """The diffusers pipeline loop; for the Euler family the state is converted to the
    variance-preserving scale our callback reports, x / sqrt(1 + sigma²)."""
    generator = torch.Generator().manual_seed(seed)
    if steps is not None:
        scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    states = []
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        out = toy_model(model_input, t.float().expand(x.shape[0]))
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
        states.append(x / math.sqrt(1 + float(scheduler.sigmas[i + 1]) ** 2) if sigma_state else x)
    return states


def assert_same_trajectory(ours: list[Tensor], reference: list[Tensor]) -> None:
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")


# (our sampler name, our kwargs, diffusers scheduler factory, diffusers step kwargs, state in sigma scale)
REFERENCES = {
    "ddpm": ({}, lambda **c: DDPMScheduler(**c, clip_sample=False), {}, False),
    "ddim_eta0": ({"eta": 0.0}, lambda **c: DDIMScheduler(**c, clip_sample=False), {"eta": 0.0}, False),
    "ddim_eta1": ({"eta": 1.0}, lambda **c: DDIMScheduler(**c, clip_sample=False), {"eta": 1.0}, False),
    "euler": ({}, EulerDiscreteScheduler, {}, True),
    "euler_a": ({}, EulerAncestralDiscreteScheduler, {}, True),
    "dpmpp_2m": ({}, lambda **c: DPMSolverMultistepScheduler(**c, algorithm_type="dpmsolver++", solver_order=2), {}, False),
}

CASES = [
    (name, spacing)
    for name in REFERENCES
    for spacing in ("leading", "trailing", "linspace")
    # diffusers' DDIM steps to t - 1000 // steps, which leaves a linspace grid; see test_ddim_linspace_*.
    if not (name.startswith("ddim") and spacing == "linspace")
]


def run_case(case: str, spacing: str, steps: int = 10, prediction: str = "eps", seed: int = 0, **extra) -> None:
    our_kwargs, factory, step_kwargs, sigma_state = REFERENCES[case]
    name = case.split("_eta")[0]
    diffusers_extra = {("use_karras_sigmas" if k == "karras" else k): v for k, v in extra.items()}
    scheduler = factory(**SD_BETAS, timestep_spacing=spacing, prediction_type=DIFFUSERS_PREDICTION[prediction], **diffusers_extra)
    sampler = build_sampler(name, NoiseSchedule(), steps, spacing=spacing, **our_kwargs, **extra)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))
    reference = diffusers_trajectory(scheduler, steps, x_T, seed, sigma_state, **step_kwargs)
    assert_same_trajectory(our_trajectory(sampler, x_T, seed, prediction), reference)


@pytest.mark.parametrize("case,spacing", CASES)
def test_matches_diffusers(case: str, spacing: str) -> None:
    run_case(case, spacing)


@pytest.mark.parametrize("case,spacing", [("ddim_eta0", "leading"), ("ddpm", "trailing"), ("euler", "linspace"), ("euler_a", "trailing"), ("dpmpp_2m", "linspace")])
def test_matches_diffusers_v_prediction(case: str, spacing: str) -> None:
    run_case(case, spacing, prediction="v")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_karras_matches_diffusers(spacing: str) -> None:
    run_case("euler", spacing, karras=True)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_dpmpp_2m_karras_matches_diffusers(spacing: str) -> None:
    run_case("dpmpp_2m", spacing, steps=15, karras=True)


def test_stable_diffusion_ddim_config_matches_diffusers() -> None:
    """SD's own config: leading spacing with steps_offset 1, 20 steps."""
    run_case("ddim_eta0", "leading", steps=20, steps_offset=1)


def test_ddim_linspace_eta0_matches_first_order_dpm_solver() -> None:
    """First-order DPM-Solver++ is DDIM (eta 0); diffusers' version accepts our grid as custom timesteps."""
    schedule, steps = NoiseSchedule(), 10
    sampler = build_sampler("ddim", schedule, steps, spacing="linspace")
    grid = [int(t) for t in sampler.timesteps]
    assert grid[0] == 999 and grid[-1] == 0
    scheduler = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=1)
    scheduler.set_timesteps(timesteps=grid)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    reference = diffusers_trajectory(scheduler, None, x_T, 0)
    assert_same_trajectory(our_trajectory(sampler, x_T, 0), reference)


def test_ddim_linspace_eta1_matches_ddpm() -> None:
    """DDIM with eta 1 is DDPM's ancestral sampler on the same grid."""
    steps = 10
    sampler = build_sampler("ddim", NoiseSchedule(), steps, spacing="linspace", eta=1.0)
    scheduler = DDPMScheduler(**SD_BETAS, timestep_spacing="linspace", clip_sample=False)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    reference = diffusers_trajectory(scheduler, steps, x_T, 3)
    assert_same_trajectory(our_trajectory(sampler, x_T, 3), reference)


def test_stochastic_samplers_depend_on_the_generator() -> None:
    x_T = torch.randn(SHAPE)
    for name, kwargs in [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_a", {})]:
        sampler = build_sampler(name, NoiseSchedule(), 10, **kwargs)
        a, b = our_trajectory(sampler, x_T, 0)[-1], our_trajectory(sampler, x_T, 1)[-1]
        assert (a - b).abs().max() > 1e-3, name
        torch.testing.assert_close(a, our_trajectory(sampler, x_T, 0)[-1], rtol=0, atol=0)


def test_timesteps_for_spacings() -> None:
    schedule = NoiseSchedule()
    assert timesteps_for(schedule, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timesteps_for(schedule, 10, "leading", steps_offset=1).tolist()[0] == 901
    assert timesteps_for(schedule, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps_for(schedule, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert timesteps_for(schedule, 3, "trailing").tolist() == [999, 666, 332]


def test_karras_sigmas_closed_form() -> None:
    sigmas = karras_sigmas(0.1, 10.0, 3, rho=7.0)
    middle = ((0.1 ** (1 / 7) + 10 ** (1 / 7)) / 2) ** 7
    torch.testing.assert_close(sigmas, torch.tensor([10.0, middle, 0.1], dtype=torch.float64))


def test_build_sampler_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="ddim.*dpmpp_2m.*euler"):
        build_sampler("heun", NoiseSchedule(), 10)


def test_eps_prediction_at_zero_snr_is_rejected() -> None:
    schedule = NoiseSchedule(zero_terminal_snr=True)
    sampler = build_sampler("ddim", schedule, 10, spacing="trailing")
    with pytest.raises(ValueError, match="zero SNR"):
        sampler.sample(Denoiser(toy_model, "eps"), torch.randn(SHAPE), progress=False)
    x = sampler.sample(Denoiser(toy_model, "v"), torch.randn(SHAPE), progress=False)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_discrete_samplers_start_at_the_terminal_step_of_a_zero_snr_schedule(name: str) -> None:
    """Leading spacing never visits t = 999, where a zero-terminal-SNR model learnt to draw from the
    prompt alone, so such a schedule defaults to trailing; SD's schedule keeps leading."""
    zero_snr = build_sampler(name, NoiseSchedule(zero_terminal_snr=True), 25)
    assert zero_snr.spacing == "trailing" and zero_snr.timesteps[0] == 999 and zero_snr.alpha_bars[0] == 0.0
    sd = build_sampler(name, NoiseSchedule(), 25)
    assert sd.spacing == "leading" and sd.timesteps[0] == 960


@pytest.mark.parametrize("name,kwargs", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler", {}), ("euler_a", {"karras": True}), ("dpmpp_2m", {})])
def test_sampling_loop_never_reads_tensor_values_on_the_host(name: str, kwargs: dict) -> None:
    """On the meta device any .item(), bool() or Python branch on a tensor raises, so a loop that
    runs there has no per-step host synchronisation on a GPU either."""
    x_T = torch.randn(SHAPE, device="meta")
    mask = torch.ones(1, 1, 8, 8, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        torch.ones(1, device="meta").item()
    sampler = build_sampler(name, NoiseSchedule(), 5, **kwargs)
    out = sampler.sample(Denoiser(toy_model_meta, "eps"), x_T, progress=False, x0=torch.zeros_like(x_T), mask=mask, strength=0.8)
    assert out.device.type == "meta" and out.shape == SHAPE


def toy_model_meta(x: Tensor, t: Tensor) -> Tensor:
    return torch.tanh(x) * t.view(-1, 1, 1, 1)


# --- img2img and inpainting -------------------------------------------------------------------

ALL_SAMPLERS = [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 1.0}), ("euler", {}), ("euler_a", {}), ("dpmpp_2m", {}), ("euler", {"karras": True})]


@pytest.mark.parametrize("name,kwargs", ALL_SAMPLERS)
def test_img2img_strength_endpoints(name: str, kwargs: dict) -> None:
    sampler = build_sampler(name, NoiseSchedule(), 8, **kwargs)
    x0, x_T = torch.randn(SHAPE), torch.randn(SHAPE)
    run = lambda **kw: sampler.sample(Denoiser(toy_model, "eps"), x_T, generator=torch.Generator().manual_seed(0), progress=False, **kw)  # noqa: E731
    assert torch.equal(run(x0=x0, strength=0.0), x0)
    torch.testing.assert_close(run(x0=x0, strength=1.0), run(), rtol=0, atol=0)
    halfway = run(x0=x0, strength=0.5)
    assert (halfway - x0).abs().mean() > 1e-3
    assert (halfway - run()).abs().mean() > 1e-3


def test_img2img_matches_diffusers_add_noise_and_begin_index() -> None:
    """The diffusers img2img pipeline: add_noise at timesteps[start], then step from `start`."""
    steps, strength = 10, 0.6
    sampler = build_sampler("euler", NoiseSchedule(), steps, spacing="leading")
    scheduler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    start = steps - int(steps * strength)
    scheduler.set_begin_index(start)
    x0, x_T = torch.randn(SHAPE), torch.randn(SHAPE)
    x = scheduler.add_noise(x0, x_T, scheduler.timesteps[start : start + 1])
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t.expand(SHAPE[0])), t, x).prev_sample
    ours = sampler.sample(Denoiser(toy_model, "eps"), x_T, x0=x0, strength=strength, progress=False)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", ALL_SAMPLERS)
def test_inpainting_keeps_the_unmasked_region(name: str, kwargs: dict) -> None:
    sampler = build_sampler(name, NoiseSchedule(), 8, **kwargs)
    x0, x_T = torch.randn(SHAPE), torch.randn(SHAPE)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    plain = sampler.sample(Denoiser(toy_model, "eps"), x_T, generator=torch.Generator().manual_seed(0), progress=False)
    out = sampler.sample(Denoiser(toy_model, "eps"), x_T, generator=torch.Generator().manual_seed(0), progress=False, x0=x0, mask=mask)
    keep = mask.expand(SHAPE) == 0
    assert torch.equal(out[keep], x0[keep])
    assert (out[~keep] - x0[~keep]).abs().mean() > 0.1
    # The generated region sees the kept one: it differs from plain sampling with the same noise.
    assert (out[~keep] - plain[~keep]).abs().mean() > 1e-3


def test_callback_gets_every_step_and_progress_bar_is_optional(capsys) -> None:
    sampler = build_sampler("dpmpp_2m", NoiseSchedule(), 6)
    seen = []
    final = sampler.sample(Denoiser(toy_model, "eps"), torch.randn(SHAPE), callback=lambda i, x: seen.append(i), progress=False)
    assert seen == list(range(6))
    assert capsys.readouterr().err == ""
    assert torch.isfinite(final).all()


# --- classifier-free guidance -------------------------------------------------------------------


class CountingModel:
    """model(x, t, context) whose output depends on all three; records each call's batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        return torch.tanh(x) * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


def test_cfg_equals_two_separate_calls() -> None:
    model = CountingModel()
    context, uncond = torch.randn(2, 5, 16), torch.randn(1, 5, 16)
    x, t = torch.randn(SHAPE), torch.tensor([10.0, 500.0])
    guided = ClassifierFreeGuidance(model, context, uncond, scale=7.5)(x, t)
    assert model.batches == [4]
    cond_out = model(x, t, context)
    uncond_out = model(x, t, uncond.expand(2, -1, -1))
    torch.testing.assert_close(guided, uncond_out + 7.5 * (cond_out - uncond_out))


def test_guidance_rescale_matches_diffusers() -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    model = CountingModel()
    context, uncond = torch.randn(2, 5, 16), torch.randn(1, 5, 16)
    x, t = torch.randn(SHAPE), torch.tensor([10.0, 999.0])
    cond_out = model(x, t, context)
    uncond_out = model(x, t, uncond.expand(2, -1, -1))
    plain = uncond_out + 7.5 * (cond_out - uncond_out)
    for rescale in (0.0, 0.7, 1.0):
        guided = ClassifierFreeGuidance(model, context, uncond, scale=7.5, rescale=rescale)(x, t)
        torch.testing.assert_close(guided, rescale_noise_cfg(plain, cond_out, guidance_rescale=rescale))
    full = ClassifierFreeGuidance(model, context, uncond, scale=7.5, rescale=1.0)(x, t)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond_out.std(dim=(1, 2, 3)))
    assert not torch.allclose(full, plain)
    with pytest.raises(ValueError, match=r"rescale must be in \[0, 1\]"):
        ClassifierFreeGuidance(model, context, uncond, scale=7.5, rescale=1.5)


def test_guidance_interval_guides_inside_it_and_is_conditional_outside() -> None:
    model = CountingModel()
    context, uncond = torch.randn(2, 5, 16), torch.randn(1, 5, 16)
    x = torch.randn(SHAPE)
    limited = ClassifierFreeGuidance(model, context, uncond, scale=7.5, interval=(0, 400))
    everywhere = ClassifierFreeGuidance(model, context, uncond, scale=7.5)
    inside, outside, mixed = torch.tensor([10.0, 400.0]), torch.tensor([401.0, 999.0]), torch.tensor([400.0, 700.0])
    torch.testing.assert_close(limited(x, inside), everywhere(x, inside))
    model.batches.clear()
    out = limited(x, outside)
    assert model.batches == [2]  # no unconditional pass outside the interval
    torch.testing.assert_close(out, model(x, outside, context))
    both = limited(x, mixed)
    torch.testing.assert_close(both[0], everywhere(x, mixed)[0])
    torch.testing.assert_close(both[1], model(x, mixed, context)[1])
    assert not torch.allclose(everywhere(x, outside), model(x, outside, context))
    for bad in ((500, 400), (-1, 400)):
        with pytest.raises(ValueError, match="guidance interval must be"):
            ClassifierFreeGuidance(model, context, uncond, scale=7.5, interval=bad)


def test_a_sampler_runs_the_unconditional_pass_only_on_the_steps_of_the_interval() -> None:
    model = CountingModel()
    schedule = NoiseSchedule(kind="scaled_linear", beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True)
    sampler = build_sampler("ddim", schedule, 10)
    guided = ClassifierFreeGuidance(model, torch.randn(2, 5, 16), torch.randn(1, 5, 16), scale=5.0, interval=(0, 400))
    sampler.sample(Denoiser(guided, "v"), torch.randn(SHAPE), progress=False)
    assert [int(t) for t in sampler.timesteps] == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert model.batches == [2] * 6 + [4] * 4


def test_cfg_calls_the_model_once_per_step_with_a_doubled_batch() -> None:
    model = CountingModel()
    guided = ClassifierFreeGuidance(model, torch.randn(2, 5, 16), torch.randn(2, 5, 16), scale=3.0)
    build_sampler("dpmpp_2m", NoiseSchedule(), 7).sample(Denoiser(guided, "eps"), torch.randn(SHAPE), progress=False)
    assert model.batches == [4] * 7


def test_every_registered_sampler_has_a_config(repo_root: str) -> None:
    import hydra
    from omegaconf import OmegaConf

    for name, cls in SAMPLERS.items():
        cfg = OmegaConf.load(f"{repo_root}/configs/sampler/{name}.yaml")
        sampler = hydra.utils.instantiate(cfg)(schedule=NoiseSchedule())
        assert type(sampler) is cls


def as_v(network, schedule: NoiseSchedule):
    """The v-prediction network that computes the same function as the ε-network `network`."""

    def v(x: Tensor, t: Tensor) -> Tensor:
        alpha_bar = torch.from_numpy(np.interp(t.double().numpy(), np.arange(1000), schedule.alphas_cumprod_f64.numpy())).float().view(-1, 1, 1, 1)
        eps = network(x, t)
        x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0

    return v


def as_x0(network, schedule: NoiseSchedule):
    """The x0-prediction network that computes the same function as the ε-network `network`."""

    def x0(x: Tensor, t: Tensor) -> Tensor:
        alpha_bar = torch.from_numpy(np.interp(t.double().numpy(), np.arange(1000), schedule.alphas_cumprod_f64.numpy())).float().view(-1, 1, 1, 1)
        return (x - (1 - alpha_bar).sqrt() * network(x, t)) / alpha_bar.sqrt()

    return x0


@pytest.mark.parametrize("name,kwargs", [("ddim", {}), ("ddpm", {}), ("euler", {}), ("euler_a", {}), ("dpmpp_2m", {})])
def test_one_function_as_eps_v_or_x0_gives_one_trajectory(name: str, kwargs: dict) -> None:
    """The Denoiser owns the parameterisation: the same function written as an ε-, v- or x0-network
    samples the same images."""
    schedule = NoiseSchedule()
    sampler = build_sampler(name, schedule, 8, **kwargs)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    run = lambda network, prediction: sampler.sample(Denoiser(network, prediction), x_T, generator=torch.Generator().manual_seed(1), progress=False)  # noqa: E731
    reference = run(toy_model, "eps")
    torch.testing.assert_close(run(as_v(toy_model, schedule), "v"), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(as_x0(toy_model, schedule), "x0"), reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="Unknown prediction"):
        Denoiser(toy_model, "score")
