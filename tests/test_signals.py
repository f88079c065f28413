"""SIGTERM and SIGINT stop a run after the same batch on every rank, with last.ckpt written and a non-zero
exit (128 + the signal); the same command resumes to the weights of an uninterrupted run. A truncated
last.ckpt falls back to the intact one kept beside it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ldm.checkpoints import find_resume_checkpoint, previous_path_for
from ldm.errors import CheckpointError
from ldm.training.run import train
from train_helpers import TINY_AUTOENCODER, compose_config, train_command

STEPS = 40


def _overrides(run_dir: Path) -> list[str]:
    return [*TINY_AUTOENCODER, f"trainer.max_steps={STEPS}", "trainer.val_check_interval=20", "checkpoint_every_n_steps=null",
            f"run_dir={run_dir}", "ckpt_path=auto"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(repo_root: str, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(train_command(repo_root, _overrides(run_dir)), cwd=repo_root, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _signal_once_running(process: subprocess.Popen, run_dir: Path, signum: int) -> str:
    """Sends `signum` once the run holds its run directory (training is being set up or under way)."""
    deadline = time.monotonic() + 300
    while not (run_dir / ".lock").is_file():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    process.send_signal(signum)
    return process.communicate(timeout=600)[1]


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_with_last_ckpt_and_the_same_command_resumes_to_the_same_weights(tmp_path: Path, repo_root: str, signum: int) -> None:
    reference = _start(repo_root, tmp_path / "reference")
    interrupted = _start(repo_root, tmp_path / "run")
    stderr = _signal_once_running(interrupted, tmp_path / "run", signum)
    assert interrupted.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = int(re.search(rf"stopped by {signal.Signals(signum).name} after step (\d+)", stderr).group(1))
    saved = _state(tmp_path / "run")
    assert 1 <= saved["generator_step"] == stopped < STEPS  # written at the step it stopped, mid-run

    resumed = subprocess.run(train_command(repo_root, _overrides(tmp_path / "run")), cwd=repo_root, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    reference.stderr.close()
    final, expected = _state(tmp_path / "run"), _state(tmp_path / "reference")
    assert final["generator_step"] == expected["generator_step"] == STEPS
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][name], tensor), name


def test_a_truncated_last_ckpt_falls_back_to_the_previous_one_and_says_so(tmp_path: Path, caplog) -> None:
    overrides = [*TINY_AUTOENCODER, "trainer.max_steps=4", "trainer.val_check_interval=4", "checkpoint_every_n_steps=2", "ckpt_path=auto"]
    train(compose_config(str(tmp_path), overrides))
    last = tmp_path / "checkpoints" / "last.ckpt"
    previous = previous_path_for(last)
    assert torch.load(previous, weights_only=True)["generator_step"] == 2 and torch.load(last, weights_only=True)["generator_step"] == 4
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # a full disk, outside our atomic write
    with caplog.at_level("WARNING"):
        assert find_resume_checkpoint(tmp_path) == previous
    assert f"Resuming from {previous}, the newest intact checkpoint (unreadable: {last})" in caplog.text

    train(compose_config(str(tmp_path), [*overrides, "trainer.max_steps=6", "trainer.val_check_interval=6"]))
    assert torch.load(last, weights_only=True)["generator_step"] == 6

    last.write_bytes(b"")
    previous.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="No checkpoint of .* reads back"):
        find_resume_checkpoint(tmp_path)
