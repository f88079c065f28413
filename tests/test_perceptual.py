"""LPIPS and shift-tolerant LPIPS: loaded offline through the real code paths, equal to the reference packages."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.losses.perceptual import LPIPS, VGG16_FILENAME, ShiftTolerantLPIPS, _package_file

STLPIPS_WEIGHTS = "weights/vST0.0/vgg_shift_tolerant.pth"


def random_vgg16_state_dict() -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG16 state dict at random init (ImageNet weights cannot be downloaded here).

    Built from torchvision's own ``make_layers`` (skipping the 120M-parameter classifier, whose
    initialisation alone takes seconds) with torchvision's initialisation; one small classifier
    entry stands in for the keys a real file carries beyond ``features``.
    """
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(module.bias, 0.0, 0.01)
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    return state


@pytest.fixture(scope="module")
def fake_torch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(random_vgg16_state_dict(), checkpoints / VGG16_FILENAME)
    return home


@pytest.fixture
def lpips_ours(fake_torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> LPIPS:
    monkeypatch.setenv("TORCH_HOME", str(fake_torch_home))
    return LPIPS()


def reference_lpips(fake_torch_home: Path) -> nn.Module:
    """The ``lpips`` package's model with our file's trunk and the package's own linear heads.

    Built on the meta device and then assigned its weights, which skips initialising the VGG
    classifier it throws away (seconds on this CPU); its input scaling is built for real.
    """
    import lpips

    with torch.device("meta"):
        reference = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    reference.scaling_layer = lpips.ScalingLayer()
    backbone = torch.load(fake_torch_home / "hub" / "checkpoints" / VGG16_FILENAME, weights_only=True)
    state = {
        key: backbone["features." + key.split(".", 2)[2]] for key in reference.net.state_dict(prefix="net.")
    }
    state.update(torch.load(_package_file("lpips", "weights/v0.1/vgg.pth"), map_location="cpu", weights_only=True))
    missing, unexpected = reference.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all(key.startswith(("lins.", "scaling_layer.")) for key in missing)
    return reference.eval()


def image_pair(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth image and a perturbed copy, in [-1, 1]."""
    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    phase = torch.rand(batch, 3, 1, 1) * 6
    x = torch.sin(3 * xx + phase) * torch.cos(2 * yy - phase)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    return x, y


@pytest.mark.filterwarnings("ignore::UserWarning:torchvision")
def test_lpips_equals_reference_package(lpips_ours: LPIPS, fake_torch_home: Path) -> None:
    reference = reference_lpips(fake_torch_home)
    x, y = image_pair(3, 48)
    y.requires_grad_(True)
    ours = lpips_ours(x, y)
    ours.sum().backward()
    our_grad, y.grad = y.grad, None
    expected = reference(x, y)
    expected.sum().backward()
    assert ours.shape == expected.shape == (3, 1, 1, 1)
    assert ours.min() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_grad, y.grad, rtol=1e-4, atol=1e-7)
    assert lpips_ours(x, x).abs().max() == 0


def test_lpips_reads_explicit_backbone_path(fake_torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    explicit = LPIPS(backbone_weights=str(fake_torch_home / "hub" / "checkpoints" / VGG16_FILENAME))
    monkeypatch.setenv("TORCH_HOME", str(fake_torch_home))
    from_cache = LPIPS()
    x, y = image_pair(2, 32)
    torch.testing.assert_close(explicit(x, y), from_cache(x, y), rtol=0, atol=0)


def test_missing_vgg_backbone_explains_the_ways_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        LPIPS()
    message = str(error.value)
    for expected in (
        VGG16_FILENAME,
        str(tmp_path / "hub" / "checkpoints"),
        f"https://download.pytorch.org/models/{VGG16_FILENAME}",
        "backbone_weights",
        "loss/perceptual=stlpips_vgg",
        "loss/perceptual=none",
    ):
        assert expected in message


def test_lpips_is_frozen_and_stays_in_eval(lpips_ours: LPIPS) -> None:
    assert not any(p.requires_grad for p in lpips_ours.parameters())
    lpips_ours.train()
    assert not any(m.training for m in lpips_ours.modules())
    x, y = image_pair(2, 32)
    y.requires_grad_(True)
    lpips_ours(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_ours.parameters())


def test_lpips_distance_is_fp32_and_close_under_bf16_autocast(lpips_ours: LPIPS) -> None:
    x, y = image_pair(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lpips_ours(x, y)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, lpips_ours(x, y), rtol=0.05, atol=0)


def test_lpips_rejects_images_too_small_for_its_trunk(lpips_ours: LPIPS) -> None:
    with pytest.raises(ValueError, match="at least 16px"):
        lpips_ours(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


@pytest.fixture(scope="module")
def shift_tolerant() -> ShiftTolerantLPIPS:
    return ShiftTolerantLPIPS()


def reference_shift_tolerant(monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """``stlpips_pytorch``'s own model. It imports IPython and torchsummary (undeclared, unused for
    inference): stand-ins are put in ``sys.modules`` for the import. Built on the meta device and
    then assigned the checkpoint, which skips initialising the VGG classifier it throws away."""
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(embed=lambda *a, **k: None))
    monkeypatch.setitem(sys.modules, "torchsummary", types.SimpleNamespace(summary=lambda *a, **k: None))
    from stlpips_pytorch import stlpips

    with torch.device("meta"):
        reference = stlpips.LPIPS(net="vgg", variant="shift_tolerant", pretrained=False, verbose=False)
    state = torch.load(_package_file("stlpips_pytorch", STLPIPS_WEIGHTS), map_location="cpu", weights_only=True)
    missing, unexpected = reference.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all(key.startswith("lins.") for key in missing)  # lins.k aliases lin{k}
    return reference.eval()


@pytest.mark.parametrize("size", [64, 37, 18])
def test_shift_tolerant_equals_reference_package(
    shift_tolerant: ShiftTolerantLPIPS, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    reference = reference_shift_tolerant(monkeypatch)
    x, y = image_pair(2, size)
    torch.testing.assert_close(shift_tolerant(x, y), reference(x, y), rtol=1e-5, atol=1e-5)


def test_shift_tolerant_checkpoint_uses_our_input_scaling(shift_tolerant: ShiftTolerantLPIPS) -> None:
    state = torch.load(_package_file("stlpips_pytorch", STLPIPS_WEIGHTS), map_location="cpu", weights_only=True)
    torch.testing.assert_close(state["scaling_layer.shift"], shift_tolerant.shift)
    torch.testing.assert_close(state["scaling_layer.scale"], shift_tolerant.scale)


def test_trained_shift_tolerant_distance_grows_with_distortion(shift_tolerant: ShiftTolerantLPIPS) -> None:
    x, _ = image_pair(2, 64)
    noise = torch.randn_like(x)
    distances = [shift_tolerant(x, (x + level * noise).clamp(-1, 1)).flatten() for level in (0.0, 0.05, 0.2, 0.6)]
    assert distances[0].abs().max() == 0
    for smaller, larger in zip(distances[1:], distances[2:]):
        assert (smaller < larger).all()
    shifted = torch.roll(x, shifts=1, dims=-1)
    assert (shift_tolerant(x, shifted).flatten() < distances[2]).all()


def test_missing_shift_tolerant_weights_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="stlpips-pytorch"):
        ShiftTolerantLPIPS(weights=str(tmp_path / "vgg_shift_tolerant.pth"))


def test_shift_tolerant_rejects_images_too_small_for_its_padding(shift_tolerant: ShiftTolerantLPIPS) -> None:
    with pytest.raises(ValueError, match="at least 18px"):
        shift_tolerant(torch.zeros(1, 3, 17, 17), torch.zeros(1, 3, 17, 17))
