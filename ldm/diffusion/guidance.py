"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser a sampler can call."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Callable

import torch
from torch import Tensor

Context = Tensor | Mapping[str, Tensor]
"""A cross-attention context, or a conditioning dict of batch-first tensors (`ldm.modules.conditioning`)."""
ConditionalModel = Callable[[Tensor, Tensor, Context], Tensor]


def _expand(context: Context, batch: int) -> Context:
    if isinstance(context, Tensor):
        return context.expand(batch, *context.shape[1:])
    return {key: _expand(value, batch) for key, value in context.items()}


def _cat(first: Context, second: Context) -> Context:
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    return {key: _cat(first[key], second[key]) for key in first}


def _shapes(context: Context) -> object:
    if isinstance(context, Tensor):
        return tuple(context.shape[1:])
    return {key: _shapes(value) for key, value in context.items()}


def checked_scale(scale: float) -> float:
    """A guidance scale w >= 0: 1 is plain conditional sampling, 0 unconditional, above 1 guided."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance scale must be a number >= 0, got {scale!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0 (1 is no guidance, 5-7.5 the usual), got {scale}")
    return value


def checked_rescale(rescale: float) -> float:
    """Lin et al.'s φ, which must lie in [0, 1]."""
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1] (0 is off, 0.7 is Lin et al.'s), got {rescale}")
    return float(rescale)


def checked_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    """(lo, hi) DDPM timesteps with 0 <= lo <= hi, or None (guide every step)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be two timesteps (lo, hi), got {interval}") from None
    if not 0.0 <= lo <= hi:
        raise ValueError(f"guidance interval must be (lo, hi) timesteps with 0 <= lo <= hi (999 the noisiest), got ({lo:g}, {hi:g})")
    return lo, hi


class ClassifierFreeGuidance:
    """`uncond + scale · (cond - uncond)`, both branches from one forward over a doubled batch.

    Contexts of batch size 1 are broadcast to the batch of x. The doubled batch is ordered
    [unconditional, conditional], as in Stable Diffusion.

    `rescale` φ > 0 is Lin et al. 2023's guidance rescale (section 3.4; diffusers' `guidance_rescale`):
    the guided output is scaled to the per-sample standard deviation of the conditional one and mixed
    back with weight φ (0.7 in the paper). Large scales inflate the output's std, which overexposes
    and oversaturates images, most of all with zero-terminal-SNR v-prediction models.

    `interval` (lo, hi), in DDPM timesteps, guides only the steps with lo <= t <= hi and uses the
    conditional prediction alone elsewhere (one forward, no unconditional pass): Kynkäänniemi et al.
    2024, "Applying guidance in a limited interval". Guidance at the highest noise levels, where the
    layout and colours are chosen, pushes samples toward the few modes the conditional and
    unconditional predictions disagree on most; at the lowest it mostly sharpens. Deciding whether a
    step needs the unconditional pass reads one boolean back from the device per step.
    """

    def __init__(
        self,
        model: ConditionalModel,
        context: Context,
        uncond_context: Context,
        scale: float,
        rescale: float = 0.0,
        interval: Sequence[float] | None = None,
    ) -> None:
        if _shapes(context) != _shapes(uncond_context):
            raise ValueError(f"context {_shapes(context)} and uncond_context {_shapes(uncond_context)} differ past the batch dimension")
        self.model = model
        self.context = context
        self.uncond_context = uncond_context
        self.scale = scale
        self.rescale = checked_rescale(rescale)
        self.interval = checked_interval(interval)
        self._both: Context | None = None
        self._both_batch = 0

    def _contexts(self, batch: int) -> Context:
        """[uncond, cond] for a batch of `batch`, concatenated once, not at every step."""
        if self._both is None or self._both_batch != batch:
            self._both = _cat(_expand(self.uncond_context, batch), _expand(self.context, batch))
            self._both_batch = batch
        return self._both

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.interval is None:
            return self._guided(x, t)
        lo, hi = self.interval
        inside = (t >= lo) & (t <= hi)
        if not bool(inside.any()):
            return self.model(x, t, _expand(self.context, x.shape[0]))
        guided, cond = self._guided(x, t, with_cond=True)
        return torch.where(inside.view(-1, *[1] * (x.ndim - 1)), guided, cond)

    def _guided(self, x: Tensor, t: Tensor, with_cond: bool = False):
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), self._contexts(x.shape[0]))
        uncond, cond = out.chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale != 0.0:
            dims = tuple(range(1, guided.ndim))
            factor = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
            guided = guided * (self.rescale * factor + (1.0 - self.rescale))
        return (guided, cond) if with_cond else guided
