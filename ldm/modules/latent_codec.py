"""Images <-> the latents a diffusion UNet works on: z = scale · posterior(x), x = decode(z / scale).

The one place the latent scale factor is applied. The autoencoder always runs in fp32, also under
autocast: GroupNorm in half precision gives NaNs in VAEs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.modules.autoencoder import DiagonalGaussianDistribution


class LatentCodec:
    """A frozen autoencoder and the scale factor (1 / std of its latents) that makes them unit-variance.

    `scale_factor` is a 0-dim tensor (a module's buffer, so a measured value travels with checkpoints
    and devices) or a float. The codec holds references, not copies: it is cheap to build on the fly.
    """

    def __init__(self, autoencoder: nn.Module, scale_factor: Tensor | float) -> None:
        self.autoencoder = autoencoder
        self.scale_factor = scale_factor if isinstance(scale_factor, Tensor) else torch.tensor(float(scale_factor), dtype=torch.float64)

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        factor = self.downsample_factor
        return self.latent_channels, height // factor, width // factor

    @torch.no_grad()
    def posterior(self, images: Tensor) -> DiagonalGaussianDistribution:
        """The unscaled posterior of images (B x 3 x H x W in [-1, 1])."""
        device = self.device
        with torch.autocast(device.type, enabled=False):
            return self.autoencoder.encode(images.to(device).float())

    def scale(self, z: Tensor) -> Tensor:
        """An unscaled latent (a posterior sample, mean or cached draw) in the UNet's scale."""
        return z * self.scale_factor.float()

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool = True) -> Tensor:
        """Scaled latents: a posterior sample (training), or its mean (`sample=False`: init images)."""
        posterior = self.posterior(images)
        return self.scale(posterior.sample() if sample else posterior.mode())

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images in [-1, 1] from scaled latents."""
        with torch.autocast(z.device.type, enabled=False):
            return self.autoencoder.decode(z.float() / self.scale_factor.float()).clamp(-1, 1)
