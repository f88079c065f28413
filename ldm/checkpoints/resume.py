"""Which checkpoint of a run directory a resumed run continues from: the newest that reads back."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ldm.checkpoints.io import previous_path_for, verify_checkpoint
from ldm.errors import CheckpointError

log = logging.getLogger(__name__)

LAST = "last.ckpt"
_HPC = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")  # written by Lightning when SLURM signals a requeue


def resume_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints a run directory can resume from, newest first: `checkpoints/last.ckpt`, the
    `last.previous.ckpt` kept beside it, and the `hpc_ckpt_<n>.ckpt` that Lightning writes on SLURM's
    requeue signal. Temporary files are never candidates."""
    last = Path(run_dir) / "checkpoints" / LAST
    candidates = [last, previous_path_for(last)]
    candidates += [p for p in Path(run_dir).glob("hpc_ckpt_*.ckpt") if _HPC.match(p.name)]
    found = [p for p in candidates if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest resume candidate of `run_dir` that reads back, or None for a fresh run. A candidate
    that does not (truncated by a full disk, say) is passed over with a warning that names it; if none
    does, the run stops rather than start afresh over them."""
    candidates = resume_candidates(run_dir)
    unreadable: list[str] = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            log.warning("Not resuming from %s: %s", path, err)
            unreadable.append(str(path))
            continue
        if unreadable:
            log.warning("Resuming from %s, the newest intact checkpoint (unreadable: %s).", path, ", ".join(unreadable))
        return path
    if unreadable:
        raise CheckpointError(
            f"No checkpoint of {run_dir} reads back ({', '.join(unreadable)}): move them away to start afresh, "
            "or give ckpt_path= an intact one."
        )
    return None
