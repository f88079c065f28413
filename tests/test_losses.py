"""AutoencoderLoss (reduction, adaptive GAN weight, discriminator schedule) and the PatchGAN discriminator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.losses.autoencoder_loss import AutoencoderLoss
from ldm.losses.perceptual import ShiftTolerantLPIPS
from ldm.modules.autoencoder import DiagonalGaussianDistribution
from ldm.modules.discriminator import NLayerDiscriminator


class MeanSquaredDistance(nn.Module):
    """A cheap stand-in perceptual distance with a frozen weight: ``w * mean((x - y)^2)`` per image."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0), requires_grad=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.weight * (x - y).pow(2).mean(dim=(1, 2, 3), keepdim=True)


class CountingDiscriminator(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.inner(x)


class TinyAutoencoder(nn.Module):
    """A latent parameter and a one-conv decoder whose weight plays the decoder's last layer."""

    def __init__(self, batch: int = 4, size: int = 32) -> None:
        super().__init__()
        self.moments = nn.Parameter(torch.randn(batch, 8, size, size) * 0.5)
        self.decoder = nn.Conv2d(4, 3, kernel_size=3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        return self.decoder.weight

    def forward(self) -> tuple[Tensor, DiagonalGaussianDistribution]:
        posterior = DiagonalGaussianDistribution(self.moments)
        return self.decoder(posterior.mode()), posterior


def make_loss(disc_start: int = 0, **overrides) -> AutoencoderLoss:
    settings = dict(perceptual_weight=0.7, kl_weight=1e-3, disc_weight=0.5, disc_factor=0.8)
    settings.update(overrides)
    discriminator = CountingDiscriminator(NLayerDiscriminator(ndf=8, n_layers=2))
    return AutoencoderLoss(discriminator=discriminator, perceptual=MeanSquaredDistance(), disc_start=disc_start, **settings)


def images(batch: int = 4, size: int = 32) -> Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1


def test_generator_loss_and_adaptive_weight_equal_a_hand_computation() -> None:
    loss_fn = make_loss(logvar_init=0.3)
    model = TinyAutoencoder()
    x = images()
    rec, posterior = model()
    loss, logs = loss_fn.generator_loss(x, rec, posterior, step=0, last_layer=model.last_layer)

    batch = x.shape[0]
    per_pixel = (x - rec).abs() + 0.7 * 2.0 * (x - rec).pow(2).mean(dim=(1, 2, 3), keepdim=True)
    nll = (per_pixel / torch.exp(torch.tensor(0.3)) + 0.3).sum() / batch
    kl = posterior.kl().sum() / batch
    g_loss = -loss_fn.discriminator(rec).mean()
    (nll_grad,) = torch.autograd.grad(nll, model.last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, model.last_layer, retain_graph=True)
    d_weight = 0.5 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    expected = nll + 1e-3 * kl + d_weight * 0.8 * g_loss

    torch.testing.assert_close(logs["nll"], nll.detach())
    torch.testing.assert_close(logs["kl"], kl.detach())
    torch.testing.assert_close(logs["g_loss"], g_loss.detach())
    torch.testing.assert_close(logs["d_weight"], d_weight)
    torch.testing.assert_close(loss, expected)
    assert 0 < d_weight < 1e4 and d_weight != 0.5

    (our_grad,) = torch.autograd.grad(loss, model.last_layer, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(nll + 1e-3 * kl + d_weight.detach() * 0.8 * g_loss, model.last_layer)
    torch.testing.assert_close(our_grad, expected_grad, rtol=1e-4, atol=1e-4)  # sums of ~1e3 in fp32


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_pixel_loss_option_sets_the_per_pixel_term(pixel_loss: str) -> None:
    loss_fn = make_loss(disc_start=10, perceptual_weight=0.0, kl_weight=0.0, pixel_loss=pixel_loss)
    model = TinyAutoencoder()
    x = images()
    rec, posterior = model()
    loss, logs = loss_fn.generator_loss(x, rec, posterior, step=0, last_layer=model.last_layer)
    error = x - rec
    per_pixel = error.abs() if pixel_loss == "l1" else error * error
    torch.testing.assert_close(loss, per_pixel.sum() / x.shape[0])
    torch.testing.assert_close(logs["rec"], per_pixel.mean().detach())


def test_perceptual_samples_scores_the_first_k_images_scaled_to_the_batch() -> None:
    loss_fn = make_loss(disc_start=10, kl_weight=0.0, logvar_init=0.2, perceptual_samples=2)
    model = TinyAutoencoder()
    x = images()
    rec, posterior = model()
    loss, _ = loss_fn.generator_loss(x, rec, posterior, step=0, last_layer=model.last_layer)
    batch, pixels = x.shape[0], x[0].numel()
    distance = 2.0 * (x[:2] - rec[:2]).pow(2).mean(dim=(1, 2, 3))
    rec_sum = (x - rec).abs().sum() + 0.7 * distance.sum() * (batch / 2) * pixels
    expected = (rec_sum / torch.exp(torch.tensor(0.2)) + 0.2 * batch * pixels) / batch
    torch.testing.assert_close(loss, expected)
    full, _ = make_loss(disc_start=10, kl_weight=0.0, logvar_init=0.2).generator_loss(
        x, rec, posterior, step=0, last_layer=model.last_layer
    )
    assert not torch.allclose(loss, full)


def test_unknown_pixel_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="pixel_loss must be one of"):
        make_loss(pixel_loss="huber")


def test_adaptive_weight_is_clamped() -> None:
    loss_fn = make_loss(adaptive_weight_max=1e-3)
    model = TinyAutoencoder()
    rec, posterior = model()
    _, logs = loss_fn.generator_loss(images(), rec, posterior, step=0, last_layer=model.last_layer)
    torch.testing.assert_close(logs["d_weight"], torch.tensor(0.5 * 1e-3))


def test_kl_term_matches_the_closed_form_gaussian_kl() -> None:
    loss_fn = make_loss(disc_start=10)
    model = TinyAutoencoder()
    x = images()
    rec, posterior = model()
    loss, logs = loss_fn.generator_loss(x, rec, posterior, step=0, last_layer=model.last_layer)
    mean, logvar = model.moments.detach().chunk(2, dim=1)
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    closed_form = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).sum() / x.shape[0]
    torch.testing.assert_close(logs["kl"], closed_form)
    torch.testing.assert_close(loss, logs["nll"] + 1e-3 * closed_form)


def test_discriminator_is_not_run_before_disc_start_and_is_after() -> None:
    loss_fn = make_loss(disc_start=5)
    model = TinyAutoencoder()
    x = images()
    rec, posterior = model()
    counter = loss_fn.discriminator

    assert not loss_fn.discriminator_active(4) and loss_fn.discriminator_active(5)
    _, g_logs = loss_fn.generator_loss(x, rec, posterior, step=4, last_layer=model.last_layer)
    d_loss, d_logs = loss_fn.discriminator_loss(x, rec, step=4)
    assert counter.calls == 0
    assert g_logs["g_loss"] == 0 and g_logs["d_weight"] == 0 and g_logs["disc_factor"] == 0
    assert d_loss == 0 and not d_loss.requires_grad and set(d_logs) == {"disc_loss"}

    _, g_logs = loss_fn.generator_loss(x, rec, posterior, step=5, last_layer=model.last_layer)
    assert counter.calls == 1
    assert g_logs["d_weight"] > 0 and g_logs["disc_factor"] == pytest.approx(0.8)
    loss_fn.discriminator_loss(x, rec, step=5)
    assert counter.calls == 3


def test_discriminator_loss_is_the_hinge_and_gives_the_autoencoder_no_gradient() -> None:
    loss_fn = make_loss()
    model = TinyAutoencoder()
    x = images()
    rec, _ = model()
    d_loss, logs = loss_fn.discriminator_loss(x, rec, step=0)
    d_loss.backward()

    assert model.decoder.weight.grad is None and model.moments.grad is None
    discriminator_params = list(loss_fn.discriminator.parameters())
    assert all(p.grad is not None for p in discriminator_params)
    with torch.no_grad():
        real, fake = loss_fn.discriminator(x), loss_fn.discriminator(rec)
    expected = 0.8 * 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    torch.testing.assert_close(logs["disc_loss"], expected)
    torch.testing.assert_close(logs["logits_real"], real.mean())
    torch.testing.assert_close(logs["logits_fake"], fake.mean())


def test_learned_logvar_goes_to_the_generator_optimizer_and_gets_a_gradient() -> None:
    loss_fn = make_loss(learn_logvar=True, logvar_init=0.5)
    assert loss_fn.generator_parameters() == [loss_fn.logvar]
    model = TinyAutoencoder()
    rec, posterior = model()
    loss, logs = loss_fn.generator_loss(images(), rec, posterior, step=0, last_layer=model.last_layer)
    loss.backward()
    assert loss_fn.logvar.grad is not None and loss_fn.logvar.grad != 0
    assert logs["logvar"] == pytest.approx(0.5)

    fixed = make_loss(logvar_init=0.5)
    assert fixed.generator_parameters() == []
    assert not any(p is fixed.logvar for p in fixed.parameters())
    assert set(fixed.state_dict()) == set(loss_fn.state_dict())


def test_checkpoints_leave_out_the_frozen_perceptual_network() -> None:
    loss_fn = make_loss(learn_logvar=True)
    parent = nn.Module()
    parent.loss = loss_fn
    state = parent.state_dict()
    assert "loss.logvar" in state and any(key.startswith("loss.discriminator.") for key in state)
    assert not any(key.startswith("loss.perceptual.") for key in state)

    fresh = nn.Module()
    fresh.loss = make_loss(learn_logvar=True)
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh.loss.logvar, loss_fn.logvar)
    assert fresh.loss.perceptual.weight == 2.0
    state["loss.perceptual.weight"] = torch.tensor(3.0)
    fresh.load_state_dict(state, strict=True)
    assert fresh.loss.perceptual.weight == 3.0


def test_validation_without_autograd_uses_no_adaptive_weight() -> None:
    loss_fn = make_loss()
    model = TinyAutoencoder()
    with torch.no_grad():
        rec, posterior = model()
        loss, logs = loss_fn.generator_loss(images(), rec, posterior, step=0, last_layer=model.last_layer)
    assert logs["d_weight"] == 0
    torch.testing.assert_close(loss, logs["nll"] + 1e-3 * logs["kl"])


def test_bf16_autocast_keeps_the_loss_and_adaptive_weight_in_fp32() -> None:
    loss_fn = make_loss()
    model = TinyAutoencoder()
    x = images()
    rec, posterior = model()
    _, reference = loss_fn.generator_loss(x, rec, posterior, step=0, last_layer=model.last_layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec, posterior = model()
        loss, logs = loss_fn.generator_loss(x, rec, posterior, step=0, last_layer=model.last_layer)
    assert loss.dtype == torch.float32 and logs["d_weight"].dtype == torch.float32
    torch.testing.assert_close(logs["d_weight"], reference["d_weight"], rtol=0.1, atol=0)


def test_loss_falls_while_training_a_tiny_reconstruction() -> None:
    loss_fn = make_loss(disc_start=15)
    model = TinyAutoencoder(batch=2, size=16)
    x = images(batch=2, size=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    disc_optimizer = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-3)
    history = []
    for step in range(30):
        rec, posterior = model()
        loss, logs = loss_fn.generator_loss(x, rec, posterior, step=step, last_layer=model.last_layer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss_fn.discriminator_active(step):
            d_loss, _ = loss_fn.discriminator_loss(x, rec, step=step)
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_optimizer.step()
        history.append(logs)
    assert history[14]["total"] < 0.6 * history[0]["total"]
    assert history[-1]["d_weight"] > 0
    assert history[-1]["rec"] < 0.7 * history[14]["rec"] < 0.5 * history[0]["rec"]


def test_no_host_sync_in_the_generator_and_discriminator_losses() -> None:
    if not torch.cuda.is_available():
        pytest.skip("host synchronisation is only observable on CUDA")
    loss_fn = make_loss()
    loss_fn.perceptual = ShiftTolerantLPIPS()
    loss_fn.cuda()
    model = TinyAutoencoder().cuda()
    x = images().cuda()
    rec, posterior = model()
    loss_fn.generator_loss(x, rec, posterior, step=0, last_layer=model.last_layer)  # warm-up (lazy init)
    torch.cuda.set_sync_debug_mode("error")
    try:
        rec, posterior = model()
        loss, _ = loss_fn.generator_loss(x, rec, posterior, step=0, last_layer=model.last_layer)
        loss.backward()
        d_loss, _ = loss_fn.discriminator_loss(x, rec, step=0)
        d_loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# taming-transformers NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3): parameter names and shapes.
TAMING_PATCHGAN = {
    "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
    "main.2.weight": (128, 64, 4, 4), "main.3.weight": (128,), "main.3.bias": (128,),
    "main.5.weight": (256, 128, 4, 4), "main.6.weight": (256,), "main.6.bias": (256,),
    "main.8.weight": (512, 256, 4, 4), "main.9.weight": (512,), "main.9.bias": (512,),
    "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,),
}  # fmt: skip


def test_discriminator_has_taming_parameter_layout_and_pix2pix_init() -> None:
    discriminator = NLayerDiscriminator()
    shapes = {name: tuple(p.shape) for name, p in discriminator.named_parameters()}
    assert shapes == TAMING_PATCHGAN
    conv_weights = torch.cat([discriminator.main[i].weight.detach().flatten() for i in (0, 2, 5, 8, 11)])
    assert conv_weights.mean().abs() < 1e-3 and conv_weights.std() == pytest.approx(0.02, rel=0.02)
    bn_weights = torch.cat([discriminator.main[i].weight.detach() for i in (3, 6, 9)])
    assert bn_weights.mean() == pytest.approx(1.0, abs=0.005) and bn_weights.std() == pytest.approx(0.02, rel=0.15)
    assert all(discriminator.main[i].bias.abs().max() == 0 for i in (3, 6, 9))


def test_discriminator_logits_see_70x70_patches() -> None:
    discriminator = NLayerDiscriminator(ndf=8).eval()
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    logits = discriminator(x)
    assert logits.shape == (1, 1, 14, 14)
    logits[0, 0, 7, 7].backward()
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero()
    cols = x.grad.abs().sum(dim=(0, 1, 2)).nonzero()
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


def test_actnorm_discriminator_initialises_from_the_first_batch_once() -> None:
    discriminator = NLayerDiscriminator(ndf=8, n_layers=2, use_actnorm=True)
    actnorm = discriminator.main[3]
    assert discriminator.main[2].bias is not None and actnorm.initialized == 0
    captured = []
    actnorm.register_forward_hook(lambda module, args, output: captured.append(output.detach().clone()))
    discriminator(torch.randn(4, 3, 32, 32) * 3 + 1)
    per_channel = captured[0].transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(16), atol=1e-3, rtol=0)
    assert actnorm.initialized == 1
    loc = actnorm.loc.detach().clone()
    discriminator(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(actnorm.loc.detach(), loc)

    resumed = NLayerDiscriminator(ndf=8, n_layers=2, use_actnorm=True)
    resumed.load_state_dict(discriminator.state_dict())
    resumed(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(resumed.main[3].loc.detach(), loc)
