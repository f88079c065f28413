"""Transformer blocks of the Stable Diffusion UNet, with parameter names in the CompVis layout.

``SpatialTransformer`` turns a feature map into a token sequence, runs ``BasicTransformerBlock``s
over it (self-attention, cross-attention to the text context, GEGLU feed-forward) and adds the
result back to its input.
"""

import torch.nn.functional as F
from torch import Tensor, nn


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` to ``context`` (to ``x`` itself when no context is given)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        batch, _, tokens, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class GEGLU(nn.Module):
    """Linear projection to twice the width; one half, through GELU, gates the other."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to ``context``, feed-forward, each residual."""

    def __init__(
        self, dim: int, n_heads: int, d_head: int, context_dim: int | None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a ``(B, C, H, W)`` feature map, conditioned on ``context``.

    ``use_linear`` projects in and out with ``nn.Linear`` on tokens (SD 2.x) instead of 1x1
    convolutions on the map (SD 1.x); the two are the same function with differently shaped weights.
    ``proj_out`` starts at zero so that a fresh block is the identity.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        context_dim: int | None,
        depth: int = 1,
        dropout: float = 0.0,
        use_linear: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(norm_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim, dropout) for _ in range(depth)
        )
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h
