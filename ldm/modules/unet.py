"""The Stable Diffusion UNet (CompVis ``openaimodel.UNetModel``), text-conditioned through cross-attention,
or class-conditioned through a learned table added to the timestep embedding (``num_classes``).

Parameter names follow the CompVis layout (``input_blocks.{i}.{j}``, ``middle_block``,
``output_blocks``, ``time_embed``, ``out``), so the ``model.diffusion_model.`` weights of an SD 1.x or
2.x checkpoint load into it with ``strict=True``, and its state dict goes through diffusers'
``convert_ldm_unet_checkpoint``.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import SpatialTransformer
from ldm.modules.timestep import timestep_embedding


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added in between, plus a skip connection."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers that hands the timestep embedding and the context to those that take them."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Noise-prediction UNet: ``forward(x_t, t, context)`` returns a tensor shaped like ``x_t``.

    ``attention_resolutions`` lists downsampling factors (1 = full latent resolution) at which a
    ``SpatialTransformer`` follows each ResBlock. Heads are ``num_heads`` per block, or, when
    ``num_head_channels`` is not -1, as many as give heads of that width (SD 2.x).
    ``context_dim=None``: no context; the cross-attention layers attend to the feature map itself.
    ``num_classes``: ``forward(..., y=labels)`` adds ``label_emb(labels)`` to the timestep embedding.
    ``gradient_checkpointing`` recomputes each input/middle/output block in the backward pass
    (``torch.utils.checkpoint`` with ``use_reentrant=False``, which replays autocast).
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_res_blocks: int = 2,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_heads: int = 8,
        num_head_channels: int = -1,
        context_dim: int | None = 768,
        transformer_depth: int = 1,
        use_linear_in_transformer: bool = False,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        norm_groups: int = 32,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if num_head_channels == -1 and num_heads < 1:
            raise ValueError("set num_heads, or num_head_channels to a width")
        self.model_channels = model_channels
        self.in_channels = in_channels
        self.gradient_checkpointing = gradient_checkpointing
        time_embed_dim = model_channels * 4
        attention_resolutions = set(attention_resolutions)

        def transformer(channels: int) -> SpatialTransformer:
            if num_head_channels == -1:
                heads, head_dim = num_heads, channels // num_heads
            else:
                heads, head_dim = channels // num_head_channels, num_head_channels
            if heads * head_dim != channels:
                raise ValueError(f"{channels} channels do not split into heads ({heads} x {head_dim})")
            return SpatialTransformer(
                channels,
                heads,
                head_dim,
                context_dim,
                depth=transformer_depth,
                dropout=dropout,
                use_linear=use_linear_in_transformer,
                norm_groups=norm_groups,
            )

        def res_block(channels: int, out: int) -> ResBlock:
            return ResBlock(channels, time_embed_dim, out, dropout=dropout, norm_groups=norm_groups)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        channels, factor = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(channels, model_channels * mult)]
                channels = model_channels * mult
                if factor in attention_resolutions:
                    layers.append(transformer(channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(channels)))
                skip_channels.append(channels)
                factor *= 2

        self.downsample_factor = factor
        self.middle_block = TimestepEmbedSequential(
            res_block(channels, channels), transformer(channels), res_block(channels, channels)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(channels + skip_channels.pop(), model_channels * mult)]
                channels = model_channels * mult
                if factor in attention_resolutions:
                    layers.append(transformer(channels))
                if level and i == num_res_blocks:
                    layers.append(Upsample(channels))
                    factor //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(norm_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def _run(self, block: TimestepEmbedSequential, h: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """Predict from latents ``x`` (B, C, H, W), ``timesteps`` (B,), ``context`` (B, tokens, context_dim)
        and, for a class-conditional UNet, class ids ``y`` (B,)."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y).to(dtype)
        h = x.to(dtype)
        context = None if context is None else context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)
