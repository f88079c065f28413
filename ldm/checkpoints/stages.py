"""Which stage wrote a checkpoint, and the one check that it is the stage a command needs."""

from __future__ import annotations

import os
from typing import Any

from ldm.errors import CheckpointStageError

STAGES = {"autoencoder": "stage-1 (autoencoder)", "ldm": "stage-2 (ldm)"}
HOW_TO_MAKE = {
    "autoencoder": "Train one with `python train.py stage=autoencoder`; its checkpoints/last.ckpt is the file.",
    "ldm": "Train one with `python train.py stage=ldm autoencoder_ckpt=...`; its checkpoints/last.ckpt is the file.",
}


def checkpoint_stage(ckpt: dict[str, Any]) -> str | None:
    """"autoencoder", "ldm", or None for a file train.py did not write."""
    return ckpt.get("ldm_stage") or (ckpt.get("hyper_parameters") or {}).get("stage")


def require_stage(ckpt: dict[str, Any], expected: str, path: str | os.PathLike | None, hint: str | None = None) -> None:
    """Raises `CheckpointStageError` unless `ckpt` was written by stage `expected`."""
    stage = checkpoint_stage(ckpt)
    if stage == expected:
        return
    name = str(path) if path else "This checkpoint"
    what = f"a {stage!r} checkpoint" if stage else "not a checkpoint written by ldm's train.py"
    hint = HOW_TO_MAKE[expected] if hint is None else hint
    raise CheckpointStageError(f"{name} is {what}, not a {STAGES[expected]} one. {hint}".strip())
