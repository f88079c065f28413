"""Skip-and-count for NaN/Inf losses, failing fast once they persist."""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import Tensor

from ldm.errors import LdmError

log = logging.getLogger(__name__)

Sync = Callable[[Tensor], Tensor]


class NonFiniteLossError(LdmError, RuntimeError):
    """The loss was NaN/Inf for `max_nonfinite_steps` steps in a row: going on would waste the cluster."""


class NonFiniteGuard:
    """Counts non-finite losses; `check` says whether a step may go on.

    A single NaN batch (a corrupt sample, an fp16 overflow) is skipped so a long run survives it;
    `max_consecutive` in a row means the run has diverged, and going on would waste the cluster.
    Under DDP the decision is taken by all ranks together (`sync`, a min over ranks): if one rank
    skipped its backward while the others ran theirs, their gradient all-reduce would wait forever.
    The counters go into checkpoints (`state_dict`), so a resumed run keeps counting.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, loss: Tensor, step: int, sync: Sync | None = None) -> bool:
        """Reads one boolean back from the device: whether to skip must be known before the backward."""
        local = torch.isfinite(loss.detach()).all()
        everywhere = bool(sync(local.float()) > 0) if sync is not None else bool(local)
        if everywhere:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        where = f"loss {loss.detach().float().sum().item()}" if not bool(local) else "loss finite here, not on another rank"
        log.warning("Non-finite loss at step %d (%s): step skipped (%d in a row, %d in total).",
                    step, where, self.consecutive, self.total_skipped)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"The loss was NaN/Inf for {self.consecutive} steps in a row (last at step {step}): the run has "
                "diverged. Lower the learning rate, enable gradient clipping (trainer.gradient_clip_val=1.0 in stage=ldm, "
                "stage.module.gradient_clip_val=1.0 in stage=autoencoder), use bf16-mixed rather than 16-mixed, or check "
                "the data. Raise max_nonfinite_steps to tolerate more."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])


def min_over_ranks(module: pl.LightningModule) -> Sync | None:
    """The strategy's min-reduction over ranks of a module attached to a trainer (None otherwise)."""
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return None
    return lambda flag: trainer.strategy.reduce(flag, reduce_op="min")
