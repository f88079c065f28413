"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser a sampler can call."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

ConditionalModel = Callable[[Tensor, Tensor, Tensor], Tensor]


class ClassifierFreeGuidance:
    """`uncond + scale · (cond - uncond)`, both branches from one forward over a doubled batch.

    Contexts of batch size 1 are broadcast to the batch of x. The doubled batch is ordered
    [unconditional, conditional], as in Stable Diffusion.
    """

    def __init__(self, model: ConditionalModel, context: Tensor, uncond_context: Tensor, scale: float) -> None:
        if context.shape[1:] != uncond_context.shape[1:]:
            raise ValueError(f"context {tuple(context.shape)} and uncond_context {tuple(uncond_context.shape)} differ past the batch dimension")
        self.model = model
        self.context = context
        self.uncond_context = uncond_context
        self.scale = scale

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        context = torch.cat([self.uncond_context.expand(batch, *self.uncond_context.shape[1:]), self.context.expand(batch, *self.context.shape[1:])])
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), context)
        uncond, cond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)
