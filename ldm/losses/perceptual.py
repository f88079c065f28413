"""Frozen perceptual distances for the autoencoder loss: LPIPS (VGG16) and shift-tolerant LPIPS.

Both are re-implementations that load the published weights into our own modules, so neither
the ``lpips`` nor the ``stlpips_pytorch`` package is imported at run time (the latter imports
IPython and torchsummary without declaring them). Weight files are located, never downloaded:
a missing file raises ``FileNotFoundError`` that says where it was looked for and what to do.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# LPIPS v0.1 input whitening (ImageNet statistics expressed for inputs in [-1, 1]).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / relative


def default_vgg16_path() -> Path:
    """Where torchvision would cache the ImageNet VGG16: ``$TORCH_HOME/hub/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def _vgg16_trunk(downsample: Callable[[int], list[nn.Module]]) -> tuple[nn.Sequential, tuple[int, ...]]:
    """VGG16 ``features`` up to relu5_3, with torchvision's module indices; returns it and the ReLU taps."""
    layers: list[nn.Module] = []
    taps = []
    channels = 3
    for stage, widths in enumerate(_VGG16_STAGES):
        if stage > 0:
            layers += downsample(channels)
        for width in widths:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        taps.append(len(layers) - 1)
    return nn.Sequential(*layers), tuple(taps)


def _unit_normalize(features: Tensor, eps: float = 1e-10) -> Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class _PerceptualDistance(nn.Module):
    """LPIPS head over a feature trunk: unit-normalise each tapped feature map, square the
    difference, weight channels with a learned 1x1 conv, average over space, sum over taps.

    Always frozen and in eval mode; the distance itself (after the trunk) is computed in fp32
    even under autocast.
    """

    def __init__(self, features: nn.Sequential, taps: tuple[int, ...], min_size: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = features
        self.taps = taps
        self.min_size = min_size
        widths = [stage[-1] for stage in _VGG16_STAGES]
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, kernel_size=1, bias=False) for width in widths)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> _PerceptualDistance:
        return super().train(False)

    def _load(self, state_dict: dict[str, Tensor], source: Path) -> None:
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{source} does not fit {type(self).__name__}: missing {missing}, unexpected {unexpected}"
            )

    def _tapped_features(self, image: Tensor) -> Iterator[Tensor]:
        h = (image - self.shift) / self.scale
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self.taps:
                yield h

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance between images ``x`` and ``y`` in [-1, 1], shape ``(B, 1, 1, 1)``.

        The two images go through the trunk separately so that backward only traverses the
        branch that needs a gradient (the reconstruction), not a concatenated batch.
        """
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"{type(self).__name__} needs images of at least {self.min_size}px, got {tuple(x.shape)}")
        distance = torch.zeros((), device=x.device)
        for fx, fy, head in zip(self._tapped_features(x), self._tapped_features(y), self.heads):
            with torch.autocast(device_type=x.device.type, enabled=False):
                squared = (_unit_normalize(fx.float()) - _unit_normalize(fy.float())).pow(2)
                distance = distance + head(squared).mean(dim=(2, 3), keepdim=True)
        return distance


def _lpips_vgg_downsample(channels: int) -> list[nn.Module]:
    return [nn.MaxPool2d(kernel_size=2, stride=2)]


def _from_lpips_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``lin{k}.model.1.weight`` -> ``heads.{k}.weight``; ``net.slice{s}.{i}.*`` -> ``features.{i}.*``."""
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0].startswith("lin"):
            renamed[f"heads.{parts[0][3:]}.{parts[-1]}"] = value
        elif parts[0] == "net":
            renamed[".".join(["features", *parts[2:]])] = value
    return renamed


class LPIPS(_PerceptualDistance):
    """LPIPS v0.1 with a VGG16 trunk (Zhang et al. 2018), numerically equal to ``lpips.LPIPS(net='vgg')``.

    ``backbone_weights``: torchvision's ImageNet ``vgg16-397923af.pth``; by default the copy in
    torch's hub cache, exactly where ``torchvision.models.vgg16(weights="IMAGENET1K_V1")`` puts it.
    ``linear_weights``: the calibrated heads; by default ``lpips/weights/v0.1/vgg.pth`` from the
    ``lpips`` pip package.
    """

    def __init__(self, backbone_weights: str | None = None, linear_weights: str | None = None) -> None:
        features, taps = _vgg16_trunk(_lpips_vgg_downsample)
        super().__init__(features, taps, min_size=16)
        backbone_path = self._backbone_path(backbone_weights)
        linear_path = self._linear_path(linear_weights)
        backbone = torch.load(backbone_path, map_location="cpu", weights_only=True)
        trunk_keys = set(self.features.state_dict(prefix="features."))
        state_dict = {key: value for key, value in backbone.items() if key in trunk_keys}
        state_dict.update(_from_lpips_keys(torch.load(linear_path, map_location="cpu", weights_only=True)))
        self._load(state_dict, backbone_path)
        self._freeze()

    @staticmethod
    def _backbone_path(backbone_weights: str | None) -> Path:
        path = Path(backbone_weights).expanduser() if backbone_weights else default_vgg16_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS needs torchvision's ImageNet VGG16 weights '{path.name}', not found in {path.parent}. "
                "It cannot be downloaded from here. Ways out: download it on a machine with internet from "
                f"{VGG16_URL} and put it in {default_vgg16_path().parent} (or set TORCH_HOME); or point "
                "`loss.perceptual.backbone_weights=` at the file; or use the shift-tolerant LPIPS whose "
                "weights ship inside its pip package (`loss/perceptual=stlpips_vgg`); or train without a "
                "perceptual loss (`loss/perceptual=none`)."
            )
        return path

    @staticmethod
    def _linear_path(linear_weights: str | None) -> Path:
        if linear_weights:
            path = Path(linear_weights).expanduser()
        else:
            path = _package_file("lpips", "weights/v0.1/vgg.pth") or Path("lpips/weights/v0.1/vgg.pth")
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS linear-head weights not found at {path}. They ship with the `lpips` pip package "
                "(`pip install lpips==0.1.4`), or set `loss.perceptual.linear_weights=` to a copy of vgg.pth."
            )
        return path


class BlurDownsample(nn.Module):
    """Anti-aliased stride-2 downsampling (Zhang 2019): reflect-pad by 2, depthwise [1, 2, 1]^2 / 16 blur.

    The padding of 2 (``pad_more`` in the original) is what the shift-tolerant LPIPS was trained with.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(taps, taps) / 16
        self.register_buffer("filt", kernel.expand(channels, 1, 3, 3).clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


def _shift_tolerant_downsample(channels: int) -> list[nn.Module]:
    return [nn.MaxPool2d(kernel_size=2, stride=1), BlurDownsample(channels)]


class ShiftTolerantLPIPS(_PerceptualDistance):
    """Shift-tolerant LPIPS, VGG variant (Ghildyal & Liu, ECCV 2022): LPIPS whose VGG16 trunk pools with
    stride-1 max-pooling followed by a blurred stride-2 subsampling, trunk and heads trained together.

    ``weights``: the full trained model; by default ``weights/vST0.0/vgg_shift_tolerant.pth`` from the
    ``stlpips-pytorch`` pip package. Needs images of at least 18 px (reflection padding of the
    smallest feature map).
    """

    def __init__(self, weights: str | None = None) -> None:
        features, taps = _vgg16_trunk(_shift_tolerant_downsample)
        super().__init__(features, taps, min_size=18)
        path = self._weights_path(weights)
        self._load(_from_lpips_keys(torch.load(path, map_location="cpu", weights_only=True)), path)
        self._freeze()

    @staticmethod
    def _weights_path(weights: str | None) -> Path:
        relative = "weights/vST0.0/vgg_shift_tolerant.pth"
        if weights:
            path = Path(weights).expanduser()
        else:
            path = _package_file("stlpips_pytorch", relative) or Path("stlpips_pytorch") / relative
        if not path.is_file():
            raise FileNotFoundError(
                f"Shift-tolerant LPIPS weights not found at {path}. They ship inside the `stlpips-pytorch` "
                "pip package (`pip install stlpips-pytorch==0.0.2`; it need not be importable), or set "
                "`loss.perceptual.weights=` to a copy of vgg_shift_tolerant.pth."
            )
        return path


__all__ = ["LPIPS", "ShiftTolerantLPIPS", "BlurDownsample", "default_vgg16_path", "VGG16_FILENAME", "VGG16_URL"]
