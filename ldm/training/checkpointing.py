"""Checkpoints a resumed run can trust: atomic writes, and `ckpt_path=auto` finding the newest one."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

LAST = "last.ckpt"
_HPC = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")  # written by Lightning when SLURM signals a requeue


def temp_path_for(path: Path) -> Path:
    """Where a checkpoint is written before it is renamed into place (same folder, so same filesystem)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its folder, fsyncs it, then renames it over the target.

    `os.replace` is atomic on POSIX filesystems, so a process killed while writing (SIGKILL, node
    failure, the end of a SLURM time limit) leaves the previous `last.ckpt` whole and a stray
    `.last.ckpt.tmp-<pid>`, never a truncated `last.ckpt` that the next `ckpt_path=auto` would pick.
    Remote paths (s3://, gs://) go through Lightning's own writer: object stores replace objects whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_path_for(path)
        try:
            with open(temp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Makes the rename itself durable (a power loss right after it keeps the new name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resume_candidates(run_dir: Path) -> list[Path]:
    """The complete checkpoints a run directory can resume from: `checkpoints/last.ckpt` and the
    `hpc_ckpt_<n>.ckpt` that Lightning writes on SLURM's requeue signal. Temporary files are never
    candidates."""
    candidates = [run_dir / "checkpoints" / LAST]
    candidates += [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if _HPC.match(p.name)]
    return [p for p in candidates if p.is_file()]


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written resume candidate of `run_dir`, or None for a fresh run."""
    candidates = resume_candidates(run_dir)
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None
