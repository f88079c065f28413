"""Which checkpoint of a run directory a resumed run continues from."""

from __future__ import annotations

import re
from pathlib import Path

LAST = "last.ckpt"
_HPC = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")  # written by Lightning when SLURM signals a requeue


def resume_candidates(run_dir: Path) -> list[Path]:
    """The complete checkpoints a run directory can resume from: `checkpoints/last.ckpt` and the
    `hpc_ckpt_<n>.ckpt` that Lightning writes on SLURM's requeue signal. Temporary files are never
    candidates."""
    candidates = [Path(run_dir) / "checkpoints" / LAST]
    candidates += [p for p in Path(run_dir).glob("hpc_ckpt_*.ckpt") if _HPC.match(p.name)]
    return [p for p in candidates if p.is_file()]


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written resume candidate of `run_dir`, or None for a fresh run."""
    candidates = resume_candidates(run_dir)
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None
