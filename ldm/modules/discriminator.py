"""PatchGAN discriminator (pix2pix, Isola et al. 2017) as used by CompVis taming-transformers and
Stable Diffusion's autoencoder training. Module and parameter names (``main.{i}``) follow taming's
``NLayerDiscriminator`` so its checkpoints load strictly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first training batch (Glow, Kingma 2018).

    ``initialized`` is a buffer so a resumed run does not re-initialise; the flag is also mirrored
    in Python after its first check so that training steps do not wait on the device.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._known_initialized = False

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).float()
        self.loc.copy_(-flat.mean(dim=1).view_as(self.loc))
        self.scale.copy_(1 / (flat.std(dim=1).view_as(self.scale) + 1e-6))
        self.initialized.fill_(1)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self._known_initialized:
            if not bool(self.initialized):
                self._initialize(x)
            self._known_initialized = True
        return self.scale * (x + self.loc)


def init_patchgan_weights(module: nn.Module) -> None:
    """pix2pix initialisation: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 4x4 convs, one stride-1 conv, then a 1-channel logit map.

    With ``n_layers=3`` each logit sees a 70x70 patch; a 64x64 input gives a 6x6 logit map.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False) -> None:
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        channels = ndf
        blocks = [(ndf * min(2**n, 8), 2) for n in range(1, n_layers)] + [(ndf * min(2**n_layers, 8), 1)]
        for out_channels, stride in blocks:
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                norm_layer(out_channels),
                nn.LeakyReLU(0.2, True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_patchgan_weights)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits ``(B, 1, h, w)``; positive means "real"."""
        return self.main(x)


__all__ = ["NLayerDiscriminator", "ActNorm", "init_patchgan_weights"]
