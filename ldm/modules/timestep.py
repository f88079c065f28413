"""Sinusoidal timestep embedding, as in Stable Diffusion (CompVis ``openaimodel``)."""

import math

import torch
from torch import Tensor


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Embed ``timesteps`` (shape ``(B,)``, integer or fractional) into ``(B, dim)`` float32 features.

    Frequencies run from 1 down to ``1 / max_period`` geometrically; the first half of the
    features are cosines and the second half sines (diffusers: ``flip_sin_to_cos=True``,
    ``freq_shift=0``). Computed in float32 whatever the caller's dtype, because half-precision
    timesteps near 1000 lose their integer resolution.
    """
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(-math.log(max_period) * steps / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
