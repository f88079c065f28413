"""Lightning's checkpoint IO, made atomic: the writing itself is `ldm.checkpoints.atomic_save`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (tests replace torch.save through this module to simulate a crash mid-write)
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm.checkpoints import (
    LAST,
    atomic_save,
    find_resume_checkpoint,
    read_checkpoint,
    resume_candidates,
    temp_path_for,
)

__all__ = ["LAST", "AtomicCheckpointIO", "find_resume_checkpoint", "resume_candidates", "temp_path_for"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint through `atomic_save` (temporary file, fsync, rename; for `last.ckpt` the new
    file is read back first and the one it replaces kept as `last.previous.ckpt`) and reads it with
    `read_checkpoint` (``weights_only=True``: resuming never runs code from the file).

    Remote paths (s3://, gs://) go through Lightning's own writer: object stores replace objects whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        atomic_save(checkpoint, path, keep_previous=path.name == LAST)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local_file_protocol(str(path)):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(path)
