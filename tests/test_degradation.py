"""The super-resolution model's training degradations (ldm/modules/conditioning/degradation.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torchvision.transforms.v2.functional import gaussian_blur as tv_gaussian_blur

from ldm.modules.conditioning import SuperResolutionConditioner, build_conditioner
from ldm.modules.conditioning.degradation import Degradation, downsample, gaussian_blur, jpeg

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    smooth = F.interpolate(torch.rand(n, 3, size // 4, size // 4), size=(size, size), mode="bilinear", align_corners=False)
    return (smooth * 2 - 1).clamp(-1, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / F.mse_loss(a, b)))


def test_blur_matches_torchvision_per_image_sigma() -> None:
    images = _images()
    sigmas = torch.tensor([0.5, 1.0, 1.7, 2.2])
    ours = gaussian_blur(images, sigmas)
    radius = 7  # ceil(3 * 2.2): the batch's shared kernel width
    for one, sigma, got in zip(images, sigmas.tolist(), ours):
        reference = tv_gaussian_blur(one, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_blur_of_zero_sigma_is_the_identity() -> None:
    images = _images(2)
    torch.testing.assert_close(gaussian_blur(images, torch.zeros(2)), images, rtol=0, atol=1e-6)


def test_jpeg_loses_more_at_lower_quality_and_keeps_the_range() -> None:
    images = _images(4, 64)
    decoded = {q: jpeg(images, torch.full((4,), q)) for q in (95, 75, 30, 10)}
    assert all(d.shape == images.shape and d.dtype == images.dtype for d in decoded.values())
    assert float(decoded[10].min()) >= -1 and float(decoded[10].max()) <= 1
    psnr = [_psnr(decoded[q], images) for q in (95, 75, 30, 10)]
    assert psnr == sorted(psnr, reverse=True) and psnr[0] > 25 and psnr[0] - psnr[-1] > 8


def test_noise_only_degradation_is_the_previous_gaussian_noise() -> None:
    """Checkpoints trained with `noise_level` alone see the same inputs for the same seed as before."""
    images = _images()
    torch.manual_seed(1)
    got = Degradation(noise_level=0.2)(images, 4)
    torch.manual_seed(1)
    low = F.interpolate(images, size=(8, 8), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    sigma = torch.rand(4, 1, 1, 1) * 0.2
    torch.testing.assert_close(got, (low + sigma * torch.randn_like(low)).clamp(-1, 1), rtol=0, atol=0)


def test_each_step_degrades_and_the_strength_varies_per_image() -> None:
    images = _images(16)
    clean = downsample(images, 4)
    torch.manual_seed(0)
    blurred = Degradation(blur=3.0)(images, 4)
    errors = ((blurred - clean) ** 2).flatten(1).mean(1)
    assert float(errors.max()) > 1e-3 and float(errors.max()) > 4 * float(errors.min())
    torch.manual_seed(0)
    assert not torch.equal(Degradation(jpeg_quality=5)(images, 4), clean)
    assert torch.equal(Degradation()(images, 4), clean)  # nothing configured: the clean downsampling
    assert not torch.equal(Degradation(jpeg_quality=50)(images, 4), clean)


@pytest.mark.parametrize("bad", [{"blur": -1.0}, {"noise_level": -0.1}, {"jpeg_quality": 0}, {"jpeg_quality": 101}])
def test_bad_strengths_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        Degradation(**bad)


def test_the_config_degrades_training_inputs_only() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["stage=ldm", "conditioning=superres", "conditioning.blur=1.5",
                                          "conditioning.noise_level=0.05", "conditioning.jpeg_quality=30"])
    conditioner = build_conditioner(cfg.conditioning)
    assert isinstance(conditioner, SuperResolutionConditioner)
    images = _images(8)
    clean = conditioner.low_resolution(images)
    degraded = conditioner.training_input(images)
    assert degraded.shape == clean.shape == (8, 3, 8, 8)
    assert 10 < _psnr(degraded, clean) < 40
    torch.testing.assert_close(conditioner.low_resolution(images), clean, rtol=0, atol=0)
