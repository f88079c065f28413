"""KL-regularised autoencoder with the Stable Diffusion (CompVis) architecture and parameter layout.

Parameter names match CompVis' ``ldm.models.autoencoder.AutoencoderKL`` exactly, so the
``first_stage_model.*`` weights of an SD 1.x / 2.x checkpoint (prefix stripped) load with
``strict=True``, and our state dicts go through diffusers' ``convert_ldm_vae_checkpoint``.
CompVis' kl-f4 / f8 / f16 / f32 models are configurations of :class:`KLAutoencoder`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 ``nin_shortcut`` matches channels when they change."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (the SD VAE's attention)."""

    def __init__(self, channels: int, *, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def tokens(t: Tensor) -> Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)

        attended = F.scaled_dot_product_attention(tokens(self.q(normed)), tokens(self.k(normed)), tokens(self.v(normed)))
        attended = attended.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with SD's asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_blocks(blocks: nn.ModuleList, attentions: nn.ModuleList, x: Tensor) -> Tensor:
    for index, block in enumerate(blocks):
        x = block(x)
        if attentions:
            x = attentions[index](x)
    return x


class DownLevel(nn.Module):
    """One encoder resolution: ``block.{j}``, ``attn.{j}`` (may be empty) and ``downsample`` (not on the last)."""

    def __init__(self, blocks: list[ResnetBlock], attentions: list[AttnBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attentions)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        x = run_blocks(self.block, self.attn, x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: ``block.{j}``, ``attn.{j}`` (may be empty) and ``upsample`` (not on level 0)."""

    def __init__(self, blocks: list[ResnetBlock], attentions: list[AttnBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attentions)
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        x = run_blocks(self.block, self.attn, x)
        return x if self.upsample is None else self.upsample(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, *, dropout: float, norm_groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups=norm_groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    """Image -> ``2 * z_channels`` (mean and log-variance) or ``z_channels`` feature map."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resolution: int = 256,
        z_channels: int = 4,
        double_z: bool = True,
        mid_attention: bool = True,
        norm_groups: int = 32,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        current_resolution = resolution
        for level, multiplier in enumerate(ch_mult):
            block_out = ch * multiplier
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attentions.append(AttnBlock(block_in, norm_groups=norm_groups))
            is_last = level == len(ch_mult) - 1
            self.down.append(DownLevel(blocks, attentions, None if is_last else Downsample(block_in)))
            if not is_last:
                current_resolution //= 2
        self.mid = MidBlock(block_in, dropout=dropout, norm_groups=norm_groups, attention=mid_attention)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``z_channels`` latent -> image. ``up.{i}`` is the level at resolution ``i``, run from deepest to 0."""

    def __init__(
        self,
        *,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resolution: int = 256,
        z_channels: int = 4,
        mid_attention: bool = True,
        norm_groups: int = 32,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in, dropout=dropout, norm_groups=norm_groups, attention=mid_attention)
        levels: list[UpLevel] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks, attentions = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, norm_groups=norm_groups))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attentions.append(AttnBlock(block_in, norm_groups=norm_groups))
            levels.insert(0, UpLevel(blocks, attentions, None if level == 0 else Upsample(block_in)))
            if level != 0:
                current_resolution *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """Posterior ``N(mean, diag(exp(logvar)))`` read from a ``B x 2C x h x w`` tensor (mean, logvar halves)."""

    def __init__(self, parameters: Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL divergence to ``N(0, I)``, summed over channels and space: shape ``(B,)``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])


class KLAutoencoder(nn.Module):
    """Encoder -> ``quant_conv`` -> Gaussian posterior -> ``post_quant_conv`` -> Decoder (CompVis ``AutoencoderKL``)."""

    def __init__(
        self,
        *,
        embed_dim: int = 4,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resolution: int = 256,
        z_channels: int = 4,
        double_z: bool = True,
        mid_attention: bool = True,
        norm_groups: int = 32,
    ):
        super().__init__()
        if not double_z:
            raise ValueError("KLAutoencoder needs double_z=True: the encoder must predict both mean and log-variance")
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        shared = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions,
            dropout=dropout,
            resolution=resolution,
            z_channels=z_channels,
            mid_attention=mid_attention,
            norm_groups=norm_groups,
        )
        self.encoder = Encoder(in_channels=in_channels, double_z=double_z, **shared)
        self.decoder = Decoder(out_channels=out_channels, **shared)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.embed_dim = embed_dim
        self.ch_mult = ch_mult

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim
