"""Noise schedules and training objectives: against diffusers, closed forms and sampled statistics."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import Tensor, nn

from ldm.diffusion import Denoiser, NoiseSchedule, build_sampler, diffusion_target, loss_weight, offset_noise, sample_timesteps
from ldm.diffusion.schedule import cosine_alpha_bar


@pytest.mark.parametrize(
    "kind,diffusers_kind,start,end",
    [("scaled_linear", "scaled_linear", 0.00085, 0.012), ("linear", "linear", 1e-4, 0.02), ("cosine", "squaredcos_cap_v2", 0, 0)],
)
def test_betas_match_diffusers(kind: str, diffusers_kind: str, start: float, end: float) -> None:
    ours = NoiseSchedule(kind, beta_start=start, beta_end=end)
    theirs = DDPMScheduler(beta_schedule=diffusers_kind, beta_start=start, beta_end=end)
    torch.testing.assert_close(ours.betas, theirs.betas, rtol=1e-6, atol=0)
    # diffusers accumulates ᾱ in float32; ours is float64, so they agree only to float32's drift.
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=2e-6, atol=1e-12)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == ours.sigmas.dtype == torch.float32


def test_scaled_linear_is_linear_in_sqrt_beta() -> None:
    sqrt_betas = NoiseSchedule("scaled_linear").betas_f64.sqrt()
    steps = sqrt_betas.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (0.012**0.5 - 0.00085**0.5) / 999))


def test_cosine_alphas_cumprod_closed_form() -> None:
    """ᾱ_i = f((i + 1) / T) / f(0) with f(u) = cos²((u + s) / (1 + s) · π / 2), wherever β is below its 0.999 cap."""
    schedule = NoiseSchedule("cosine", num_timesteps=1000)
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    expected = torch.tensor([math.cos(((i + 1) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / f0 for i in range(1000)], dtype=torch.float64)
    uncapped = schedule.betas_f64 < 0.999
    assert uncapped[:-1].all() and not uncapped[-1]
    torch.testing.assert_close(schedule.alphas_cumprod_f64[uncapped], expected[uncapped], rtol=1e-10, atol=1e-12)
    assert cosine_alpha_bar(0.0) == pytest.approx(f0)


def test_sigmas_are_k_diffusion_sigmas() -> None:
    schedule = NoiseSchedule()
    a = schedule.alphas_cumprod_f64
    torch.testing.assert_close(schedule.sigmas, ((1 - a) / a).sqrt().float())
    assert schedule.sigmas[-1].item() == pytest.approx(14.6146, abs=1e-3)
    assert (schedule.sigmas.diff() > 0).all()


def test_zero_terminal_snr() -> None:
    plain, rescaled = NoiseSchedule(), NoiseSchedule(zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    torch.testing.assert_close(rescaled.betas, theirs.betas, rtol=1e-4, atol=1e-6)
    t = torch.tensor([0, 500, 998, 999])
    assert rescaled.snr(t)[-1].item() == 0.0
    for prediction in ("eps", "v"):
        weights = loss_weight(rescaled, t, "min_snr", gamma=5.0, prediction=prediction)
        assert torch.isfinite(weights).all(), prediction
    assert loss_weight(rescaled, t, "min_snr", prediction="eps")[-1].item() == 1.0
    assert loss_weight(rescaled, t, "min_snr", prediction="v")[-1].item() == 0.0


def test_snr_and_min_snr_weights() -> None:
    schedule = NoiseSchedule()
    t = torch.arange(0, 1000, 37)
    a = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod[t]
    snr = a / (1 - a)
    torch.testing.assert_close(schedule.snr(t), snr, rtol=1e-4, atol=0)
    gamma = 5.0
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    torch.testing.assert_close(loss_weight(schedule, t, "min_snr", gamma, "eps"), clipped / snr, rtol=1e-4, atol=0)
    torch.testing.assert_close(loss_weight(schedule, t, "min_snr", gamma, "v"), clipped / (snr + 1), rtol=1e-4, atol=0)
    assert torch.equal(loss_weight(schedule, t, "uniform"), torch.ones(len(t)))
    with pytest.raises(ValueError, match="min_snr"):
        loss_weight(schedule, t, "p2")


def test_v_target_closed_form_and_recovery() -> None:
    schedule = NoiseSchedule()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 400, 999])
    a = schedule.alphas_cumprod_f64[t].view(-1, 1, 1, 1)
    v = diffusion_target(schedule, x0, noise, t, prediction="v")
    torch.testing.assert_close(v.double(), a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double(), rtol=0, atol=5e-6)
    x_t = schedule.q_sample(x0, t, noise)
    a = a.float()
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * x_t, noise, rtol=0, atol=1e-5)
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).get_velocity(x0, noise, t)
    torch.testing.assert_close(v, theirs, rtol=0, atol=1e-5)
    assert diffusion_target(schedule, x0, noise, t, prediction="eps") is noise
    assert diffusion_target(schedule, x0, noise, t, prediction="x0") is x0
    with pytest.raises(ValueError, match="eps"):
        diffusion_target(schedule, x0, noise, t, prediction="score")


def test_q_sample_marginals() -> None:
    schedule = NoiseSchedule()
    n = 200_000
    for step in (0, 250, 999):
        t = torch.full((n,), step)
        x_t = schedule.q_sample(torch.full((n, 1), 2.0), t, torch.randn(n, 1))
        a = schedule.alphas_cumprod_f64[step].item()
        assert x_t.mean().item() == pytest.approx(2.0 * math.sqrt(a), abs=0.01)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.01)


def test_sample_timesteps_are_uniform_and_reproducible() -> None:
    t = sample_timesteps(100_000, 1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min().item() == 0 and t.max().item() == 999
    counts = torch.bincount(t // 100, minlength=10).float()
    assert (counts / 10_000 - 1).abs().max() < 0.05
    again = sample_timesteps(100_000, 1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_offset_noise_adds_a_per_channel_constant() -> None:
    like = torch.empty(64, 3, 32, 32)
    assert torch.equal(offset_noise(like, 0.0, torch.Generator().manual_seed(1)), torch.randn(like.shape, generator=torch.Generator().manual_seed(1)))
    noise = offset_noise(like, 1.0, torch.Generator().manual_seed(1))
    channel_means = noise.mean(dim=(2, 3))
    # Plain noise has per-channel means of std 1/32; the offset adds a unit-variance constant.
    assert channel_means.std().item() == pytest.approx(math.sqrt(1 + 1 / 1024), rel=0.1)
    within = noise - noise.mean(dim=(2, 3), keepdim=True)
    assert within.std().item() == pytest.approx(1.0, rel=0.02)


def test_to_moves_the_float32_tables() -> None:
    schedule = NoiseSchedule().to("meta")
    assert schedule.betas.device.type == schedule.alphas_cumprod.device.type == schedule.sigmas.device.type == "meta"
    assert schedule.alphas_cumprod_f64.device.type == "cpu"


class TinyDenoiser(nn.Module):
    """An MLP over (x, embedding of t) for 2-D points."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), 8)) / 1000)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        angles = t.float()[:, None] * self.freqs[None]
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("prediction,weighting", [("eps", "min_snr"), ("v", "uniform")])
def test_training_with_the_objectives_learns_the_data(prediction: str, weighting: str, one_thread: None) -> None:
    """Train on a 2-D Gaussian with our target and weighting; the loss falls and DDIM reproduces the data's moments."""
    schedule = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    mean, std = torch.tensor([1.0, -0.5]), torch.tensor([0.3, 0.6])
    model = TinyDenoiser()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        x0 = mean + std * torch.randn(128, 2)
        t = sample_timesteps(128, schedule.num_timesteps, "cpu")
        noise = torch.randn_like(x0)
        pred = model(schedule.q_sample(x0, t, noise), t)
        target = diffusion_target(schedule, x0, noise, t, prediction)
        loss = (loss_weight(schedule, t, weighting, prediction=prediction) * (pred - target).square().mean(dim=1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-50:]) / 50 < 0.6 * sum(losses[:10]) / 10
    with torch.no_grad():
        samples = build_sampler("ddim", schedule, 25).sample(Denoiser(model, prediction), torch.randn(2000, 2), progress=False)
    torch.testing.assert_close(samples.mean(0), mean, rtol=0, atol=0.1)
    torch.testing.assert_close(samples.std(0), std, rtol=0.2, atol=0)
