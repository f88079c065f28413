"""Multi-node correctness without a cluster: 2 nodes x 1 process on localhost (NODE_RANK, MASTER_ADDR,
`trainer.num_nodes=2`, as SLURM or torchrun set them) reach the same weights as 1 node x 2 processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from train_helpers import TINY_AUTOENCODER, run_train

STEPS = ["trainer.max_steps=4", "trainer.val_check_interval=4", "checkpoint_every_n_steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path: Path, repo_root: str) -> None:
    common = [*TINY_AUTOENCODER, "trainer=ddp", "trainer.accelerator=cpu", *STEPS]
    one_node = run_train(repo_root, [*common, "trainer.devices=2", f"run_dir={tmp_path / 'one_node'}"], env=_env())
    assert one_node.returncode == 0, one_node.stderr[-3000:]

    port = str(_free_port())
    nodes = []
    for node_rank in (0, 1):
        # As torchrun sets them (SLURM sets SLURM_PROCID and friends instead).
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node_rank), LOCAL_RANK="0", RANK=str(node_rank), WORLD_SIZE="2")
        overrides = [*common, "trainer.devices=1", "trainer.num_nodes=2", f"run_dir={tmp_path / 'two_nodes'}"]
        nodes.append(subprocess.Popen([sys.executable, "train.py", *overrides], cwd=repo_root, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in errors[1] or "GLOBAL_RANK: 1, MEMBER: 2/2" in (tmp_path / "two_nodes" / "train.log").read_text()

    checkpoints = sorted(p.name for p in (tmp_path / "two_nodes" / "checkpoints").iterdir())
    assert checkpoints.count("last.ckpt") == 1 and not [n for n in checkpoints if n.startswith(".")]
    expected, got = _weights(tmp_path / "one_node"), _weights(tmp_path / "two_nodes")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
