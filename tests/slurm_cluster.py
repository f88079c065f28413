"""A real single-node SLURM cluster for the tests: started by `.ci/slurm_up.sh` in a temporary folder
(as root, with Debian's slurmctld/slurmd), driven with sbatch/squeue/scontrol, stopped at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not SLURM's default ports, so a system slurmctld on the same machine is left alone.
PORTS = {"SLURMCTLD_PORT": "16817", "SLURMD_PORT": "16818"}


def unavailable_reason() -> str | None:
    """Why no local cluster can be started here, or None."""
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol") if shutil.which(tool) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing: apt-get install slurmctld slurmd slurm-client)"
    if os.geteuid() != 0:
        return "starting a local SLURM cluster needs root (slurmd runs jobs as their user)"
    return None


@dataclass
class SlurmCluster:
    folder: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        env = {**self.env, **kwargs.pop("env", {})}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=kwargs.pop("timeout", 60), **kwargs)

    def sbatch(self, script: str, args: list[str], options: list[str], env: dict[str, str] | None = None) -> str:
        """Submits `script` from the repository root (so SLURM_SUBMIT_DIR is the repository) and returns the job id."""
        done = self.run("sbatch", "--parsable", *options, script, *args, cwd=REPO, env=env or {})
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        done = self.run("scontrol", "show", "job", "--oneliner", job_id)
        assert done.returncode == 0, done.stderr
        return dict(field.split("=", 1) for field in done.stdout.split() if "=" in field)

    def wait(self, job_id: str, timeout: float = 900) -> dict[str, str]:
        """Polls squeue (faster than `sbatch --wait`) until the job has left the queue; its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = self.run("squeue", "--noheader", "--jobs", job_id, "--format=%T")
            if queued.returncode == 0 and not queued.stdout.strip():
                return self.state(job_id)
            time.sleep(1)
        self.run("scancel", job_id)
        raise TimeoutError(f"SLURM job {job_id} still queued after {timeout} s: {self.state(job_id)}")

    def wait_for(self, condition, what: str, job_id: str, timeout: float = 600) -> None:
        """Waits until `condition()` while the job is still in the queue."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            state = self.state(job_id)["JobState"]
            assert state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED"), f"job {job_id} is {state} before {what}"
            time.sleep(0.5)


    def start_requeued_now(self, job_id: str, timeout: float = 600) -> None:
        """Waits for the job to be back in the queue after a requeue, then lets it start at once: SLURM
        holds a requeued job for about two minutes (Reason=BeginTime), which a test need not wait out."""
        deadline = time.monotonic() + timeout
        state = self.state(job_id)
        while state.get("Restarts", "0") == "0":
            assert state["JobState"] in ("RUNNING", "COMPLETING", "REQUEUED", "PENDING"), f"job {job_id} is {state['JobState']}"
            assert time.monotonic() < deadline, f"job {job_id} was not requeued: {state}"
            time.sleep(0.5)
            state = self.state(job_id)
        if state["JobState"] == "PENDING":
            done = self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            assert done.returncode == 0, done.stderr


def start(folder: Path) -> SlurmCluster:
    done = subprocess.run([str(REPO / ".ci" / "slurm_up.sh"), str(folder)], env={**os.environ, **PORTS},
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        stop(folder)
        raise RuntimeError(f"could not start SLURM: {done.stdout}{done.stderr}")
    return SlurmCluster(folder)


def stop(folder: Path) -> None:
    subprocess.run([str(REPO / ".ci" / "slurm_down.sh"), str(folder)], capture_output=True, timeout=120)
