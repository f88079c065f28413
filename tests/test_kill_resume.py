"""A training process SIGKILLed at a random step, then the same command again: the same final weights as
a run that was never interrupted (same seed), through `ckpt_path=auto`, atomic checkpoints, the
resumable data order and per-batch seeds."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from train_helpers import TINY_AUTOENCODER, TINY_LDM, run_train, train_command

STEPS = 12


def _overrides(run_dir: Path, stage_overrides: list[str]) -> list[str]:
    # 12 steps over 8-batch epochs: the kill can land in either epoch, and resume crosses the boundary.
    return [*stage_overrides, f"trainer.max_steps={STEPS}", "trainer.val_check_interval=6", "checkpoint_every_n_steps=1",
            f"run_dir={run_dir}", "ckpt_path=auto"]


def _kill_after_saves(command: list[str], last: Path, saves: int, cwd: str, env: dict[str, str]) -> None:
    """Starts `command` and SIGKILLs it as soon as it has written `last` `saves` times (one per step)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    deadline = time.monotonic() + 600
    try:
        while len(seen) < saves:
            assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the run made no progress"
            if last.is_file():
                seen.add(last.stat().st_mtime_ns)
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a.get("generator_step") == b.get("generator_step")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for index, state in opt_a["state"].items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][key])), (index, key)
    assert a["lr_schedulers"] == b["lr_schedulers"]


# Stage 1 (two optimizers, GAN switching on, manual optimization) in the default suite; stage 2 (EMA, scale
# factor, AdamW warm-up) takes as long again and runs with -m slow.
@pytest.mark.parametrize("stage", ["autoencoder", pytest.param("ldm", marks=pytest.mark.slow)])
def test_sigkill_at_a_random_step_then_the_same_command_reaches_the_same_weights(
    stage: str, tmp_path: Path, repo_root: str, request: pytest.FixtureRequest
) -> None:
    if stage == "autoencoder":
        stage_overrides = [*TINY_AUTOENCODER, "loss.disc_start=4"]  # the discriminator and its optimizer join at step 4
    else:
        stage_overrides = [*TINY_LDM, f"autoencoder_ckpt={request.getfixturevalue('tiny_autoencoder_ckpt')}"]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every run, whatever runs beside it
    reference = subprocess.Popen(train_command(repo_root, _overrides(reference_dir, stage_overrides)), cwd=repo_root,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    kill_at = random.SystemRandom().randint(2, STEPS - 3)
    killed = _overrides(killed_dir, stage_overrides)
    last = killed_dir / "checkpoints" / "last.ckpt"
    _kill_after_saves(train_command(repo_root, killed), last, kill_at, cwd=repo_root, env=env)
    interrupted = torch.load(last, weights_only=False)
    killed_step = interrupted.get("generator_step", interrupted["global_step"])
    assert kill_at <= killed_step < STEPS, (kill_at, killed_step)

    rerun = run_train(repo_root, killed, env=env)  # the very same command
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from {last}" in (killed_dir / "train.log").read_text()
    _, reference_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_err[-3000:]

    final = torch.load(last, weights_only=False)
    expected = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final.get("generator_step", final["global_step"]) == STEPS
    _assert_same_training_state(final, expected)
    if stage == "ldm":
        assert int(final["state_dict"]["ema.num_updates"]) == STEPS
        assert torch.equal(final["state_dict"]["scale_factor"], interrupted["state_dict"]["scale_factor"])
