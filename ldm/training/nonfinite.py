"""Skip-and-count for NaN/Inf losses, failing fast once they persist."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    """Counts non-finite losses; `check` says whether a step may go on.

    A single NaN batch (a corrupt sample, an fp16 overflow) is skipped so a long run survives it;
    `max_consecutive` in a row means the run has diverged, and going on would waste the cluster.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, loss: Tensor, step: int) -> bool:
        if bool(torch.isfinite(loss.detach()).all()):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        log.warning("Non-finite loss (%s) at step %d: step skipped (%d in a row, %d in total).",
                    loss.detach().float().item(), step, self.consecutive, self.total_skipped)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"The loss was NaN/Inf for {self.consecutive} steps in a row (last at step {step}): the run has "
                "diverged. Lower the learning rate, enable gradient clipping (trainer.gradient_clip_val=1.0 in stage=ldm, stage.module.gradient_clip_val=1.0 in stage=autoencoder), "
                "use bf16-mixed rather than 16-mixed, or check the data. Raise max_nonfinite_steps to tolerate more."
            )
        return False
