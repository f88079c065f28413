"""Learning-rate multipliers for `torch.optim.lr_scheduler.LambdaLR`."""

from __future__ import annotations

import math
from functools import partial


def _warmup_cosine(
    step: int, warmup_steps: int, decay_steps: int | None, min_ratio: float, decay_start: int | None
) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    start = warmup_steps if decay_start is None else max(decay_start, warmup_steps)
    if not decay_steps or decay_steps <= start or step < start:
        return 1.0
    progress = min(1.0, (step - start) / (decay_steps - start))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    warmup_steps: int = 0, decay_steps: int | None = None, min_ratio: float = 0.0, decay_start: int | None = None
):
    """Linear warm-up over `warmup_steps`, constant until `decay_start` (default: the end of warm-up),
    then a cosine from 1 to `min_ratio` at `decay_steps` (constant after it); `decay_steps=None` keeps
    the rate constant after warm-up.

    A late `decay_start` is the warm-up/stable/decay ("trapezoidal") schedule of Hägele et al. 2024: a
    run kept at a constant rate can be resumed from any checkpoint and annealed over its last steps,
    which recovers what a cosine over the whole run gives, without fixing the length in advance.
    Picklable, so the scheduler's state goes into checkpoints and resumes."""
    return partial(
        _warmup_cosine, warmup_steps=warmup_steps, decay_steps=decay_steps, min_ratio=min_ratio, decay_start=decay_start
    )
