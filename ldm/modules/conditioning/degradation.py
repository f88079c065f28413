"""How a super-resolution model's training input is made from its target: blur, downsample, noise, JPEG.

The classical degradation model y = JPEG((x ⊛ k)↓s + n), which Real-ESRGAN / BSRGAN (the `sr_bsr`
models of CompVis) randomise per image. Each step draws its own strength per image, uniformly up to its
configured maximum, so that the model sees everything from clean to the worst case; a maximum of 0 (or
`jpeg_quality: null`) leaves the step out. Sampling never degrades: the user's image is what it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg


def downsample(image: Tensor, factor: int) -> Tensor:
    """Antialiased bicubic downsampling by `factor`, in [-1, 1]."""
    height, width = image.shape[-2:]
    size = (height // factor, width // factor)
    return F.interpolate(image.float(), size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def gaussian_blur(image: Tensor, sigma: Tensor) -> Tensor:
    """Each image of the batch blurred by an isotropic Gaussian of its own `sigma` (pixels; 0: unchanged)."""
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    sigma = sigma.to(image.device, image.dtype).clamp_min(1e-6).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (batch, taps)
    batch, channels, height, width = image.shape
    # One grouped convolution per axis: group b*c uses image b's kernel.
    taps = kernel.repeat_interleave(channels, dim=0)
    flat = image.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect" if width > radius else "replicate"),
                    taps.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect" if height > radius else "replicate"),
                    taps.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def jpeg(image: Tensor, quality: Tensor) -> Tensor:
    """Each image JPEG-compressed at its own quality (1..100) and decoded back, in [-1, 1]."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    decoded = [decode_jpeg(encode_jpeg(one, quality=int(q))) for one, q in zip(pixels, quality.tolist())]
    return (torch.stack(decoded).float() / 127.5 - 1).to(image.device, image.dtype)


class Degradation:
    """The random degradation of a super-resolution model's low-resolution input in training.

    blur: the largest Gaussian blur sigma, in high-resolution pixels, applied before downsampling;
    noise_level: the largest standard deviation of Gaussian noise added to the low-resolution image
    (images in [-1, 1]); jpeg_quality: the lowest JPEG quality it is then compressed at (null: no JPEG).
    """

    def __init__(self, blur: float = 0.0, noise_level: float = 0.0, jpeg_quality: int | None = None) -> None:
        if blur < 0 or noise_level < 0:
            raise ValueError(f"degradation strengths must be >= 0, got blur={blur}, noise_level={noise_level}")
        if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100 (or null for no JPEG), got {jpeg_quality}")
        self.blur, self.noise_level, self.jpeg_quality = float(blur), float(noise_level), jpeg_quality

    def __call__(self, image: Tensor, factor: int) -> Tensor:
        """The degraded low-resolution version of the high-resolution batch `image`."""
        n = image.shape[0]
        if self.blur > 0:
            image = gaussian_blur(image.float(), torch.rand(n) * self.blur)
        low = downsample(image, factor)
        if self.noise_level > 0:
            sigma = (torch.rand(n, 1, 1, 1) * self.noise_level).to(low.device)
            low = (low + sigma * torch.randn_like(low)).clamp(-1, 1)
        if self.jpeg_quality is not None:
            quality = torch.randint(self.jpeg_quality, 101, (n,))
            low = jpeg(low, quality)
        return low
