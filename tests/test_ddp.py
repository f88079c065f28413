"""Two-process CPU DDP (gloo) runs of both stages through `python train.py trainer=ddp ...`, as subprocesses:
Lightning's launcher starts rank 1 by re-running the command line, which inside pytest would re-run the
test session. One run directory for both ranks, NaN skipped on all ranks together, one scale factor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_helpers import TINY_AUTOENCODER, TINY_LDM, run_train

DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on a small machine: one thread each


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_ddp_autoencoder_one_run_dir_for_both_ranks_and_nan_on_one_rank_skipped_by_both(tmp_path: Path, repo_root: str) -> None:
    # ${now:} with microseconds resolves differently in every process: rank 1 must still use rank 0's directory.
    overrides = [*TINY_AUTOENCODER, *DDP_CPU, "loss.disc_start=3", "trainer.max_steps=6", "trainer.val_check_interval=6",
                 f"run_dir={tmp_path}/runs/" + "${now:%H-%M-%S-%f}"]
    script = str(Path(repo_root) / "tests" / "scripts" / "train_nan_on_rank1.py")
    done = run_train(repo_root, overrides, env={**_env(), "NAN_BATCHES_RANK1": "4"}, cmd=[sys.executable, script])
    assert done.returncode == 0, done.stderr[-3000:]

    (run_dir,) = (tmp_path / "runs").iterdir()
    rank0, rank1 = (run_dir / "train.log").read_text(), (run_dir / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in rank0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in rank1
    assert (run_dir / "config.yaml").is_file() and str(run_dir) in (run_dir / "config.yaml").read_text()
    # Batch 4 was NaN on rank 1 only; both ranks skipped it (or rank 0's gradient all-reduce would hang).
    assert re.search(r"Non-finite loss at step 4 \(loss nan\): step skipped", rank1)
    assert re.search(r"Non-finite loss at step 4 \(loss finite here, not on another rank\): step skipped", rank0)
    ckpt = _checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["generator_step"] == 6 and ckpt["nonfinite"]["total_skipped"] == 1
    ae_state, d_state = ckpt["optimizer_states"]
    assert int(next(iter(ae_state["state"].values()))["step"]) == 6
    assert int(next(iter(d_state["state"].values()))["step"]) == 3  # the discriminator from step 3 on, under DDP


def test_ddp_ldm_measures_one_scale_factor_for_all_ranks(tmp_path: Path, tiny_autoencoder_ckpt: str, repo_root: str) -> None:
    overrides = [*TINY_LDM, *DDP_CPU, f"autoencoder_ckpt={tiny_autoencoder_ckpt}", f"run_dir={tmp_path}",
                 "trainer.max_steps=3", "trainer.val_check_interval=3"]
    done = run_train(repo_root, overrides, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    logs = (tmp_path / "train.log").read_text() + (tmp_path / "train_ddp_process_1.log").read_text()
    per_rank = re.findall(r"Latent scale factor measured over 2 batches on every rank: ([0-9.]+)", logs)
    # The ranks encode different batches: they agree only because their statistics were all-reduced.
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    ckpt = _checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert float(ckpt["state_dict"]["scale_factor"]) == pytest.approx(float(per_rank[0]), rel=1e-4)
    assert ckpt["global_step"] == 3 and int(ckpt["state_dict"]["ema.num_updates"]) == 3
    assert list((tmp_path / "images").glob("samples_step*.png"))


def test_ranks_launched_apart_with_different_run_dirs_stop_with_one_clear_message(tmp_path: Path, repo_root: str) -> None:
    # Two ranks started by hand (as torchrun or a bare srun would), each resolving its own run_dir.
    port = str(29500 + os.getpid() % 1000)
    processes = []
    for rank in (0, 1):
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "LOCAL_RANK": str(rank), "NODE_RANK": "0",
               "WORLD_SIZE": "2"}
        overrides = [*TINY_AUTOENCODER, *DDP_CPU, "trainer.max_steps=2", f"run_dir={tmp_path}/rank{rank}"]
        processes.append(subprocess.Popen([sys.executable, "train.py", *overrides], cwd=repo_root, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [1, 1], errors[0][-2000:]
    for error in errors:
        assert f"The ranks of this run disagree on its run directory or resume checkpoint: rank 0 has run_dir={tmp_path}/rank0" in error
    assert f"rank 1 has run_dir={tmp_path}/rank1" in errors[1]
    assert not (tmp_path / "rank0" / "checkpoints").exists()
