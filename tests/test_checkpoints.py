"""ldm.checkpoints: reading never runs code from a file; unreadable files give one line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    load_autoencoder,
    load_sd_state_dict,
    read_checkpoint,
    require_stage,
)
from ldm.errors import CheckpointStageError, LdmError
from ldm.inference import load_model


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_copy(real: str, out: Path, marker: Path) -> Path:
    """A real checkpoint with a payload added: it would train and sample normally while the payload runs."""
    ckpt = torch.load(real, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["note"] = Payload(marker)
    torch.save(ckpt, out)
    return out


@pytest.fixture
def payloads(tmp_path: Path, tiny_autoencoder_ckpt: str, tiny_ldm_ckpt: str) -> dict[str, Path]:
    marker = tmp_path / "PAYLOAD_RAN"
    return {
        "marker": marker,
        "autoencoder": malicious_copy(tiny_autoencoder_ckpt, tmp_path / "evil_autoencoder.ckpt", marker),
        "ldm": malicious_copy(tiny_ldm_ckpt, tmp_path / "evil_ldm.ckpt", marker),
    }


def test_the_payload_would_run_if_loaded_the_old_way(payloads) -> None:
    torch.load(payloads["ldm"], weights_only=False)
    assert payloads["marker"].exists()


def test_python_loaders_refuse_a_payload_without_running_it(payloads) -> None:
    from ldm.training.ldm_module import LatentDiffusionModule

    loaders = [
        lambda: read_checkpoint(payloads["ldm"]),
        lambda: load_model(payloads["ldm"]),
        lambda: LatentDiffusionModule.from_checkpoint(payloads["ldm"]),
        lambda: load_autoencoder(payloads["autoencoder"]),
        lambda: load_sd_state_dict(payloads["ldm"], "unet"),
    ]
    for load in loaders:
        with pytest.raises(UnsafeCheckpointError, match=r"never runs code from a file.*\.safetensors"):
            load()
    assert not payloads["marker"].exists()


def _run(repo_root: str, script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, script, *args], cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_entry_point_refuses_a_payload_with_one_line(payloads, repo_root: str, tmp_path: Path) -> None:
    tiny = ["image_size=32", "data.train.length=16", "data.val.length=8", "data.batch_size=8", "logger=csv", "trainer.max_steps=2",
            "trainer.enable_progress_bar=false"]
    runs = {
        "sample.py ckpt=": _run(repo_root, "sample.py", f"ckpt={payloads['ldm']}", "prompt=a red circle", "steps=2",
                                f"out_dir={tmp_path / 'samples'}", "progress=false"),
        "train.py autoencoder_ckpt=": _run(repo_root, "train.py", "stage=ldm", *tiny, "stage.module.scale_factor_batches=1", f"autoencoder_ckpt={payloads['autoencoder']}",
                                           f"run_dir={tmp_path / 'ldm_run'}"),
        "train.py ckpt_path=": _run(repo_root, "train.py", "stage=autoencoder", *tiny, "model.resolution=32", "loss/perceptual=none",
                                    f"ckpt_path={payloads['autoencoder']}", f"run_dir={tmp_path / 'ae_run'}"),
        "cache_latents autoencoder_ckpt=": _run(repo_root, "-m", "ldm.tools.cache_latents", f"urls={tmp_path}", f"out={tmp_path / 'cache'}",
                                                f"autoencoder_ckpt={payloads['autoencoder']}", "text_encoder=tiny", "image_size=32"),
    }
    for what, process in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, what
        assert "Traceback" not in stderr, f"{what}: {stderr[-3000:]}"
        assert "never runs code from a file" in stderr, f"{what}: {stderr[-3000:]}"
    assert not payloads["marker"].exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"not a checkpoint at all", "not a readable checkpoint"),
        (None, "not a readable checkpoint"),  # truncated: the first half of a real file
    ],
)
def test_unreadable_files_are_one_line_errors(tmp_path: Path, tiny_ldm_ckpt: str, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.ckpt"
    data = Path(tiny_ldm_ckpt).read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(CheckpointError, match=message) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value) and isinstance(err.value, LdmError)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_safetensors_round_trip_real_bytes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    loaded = read_checkpoint(tmp_path / "w.safetensors")["state_dict"]
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        read_checkpoint(tmp_path / "broken.safetensors")


def test_one_stage_check_names_both_stages() -> None:
    with pytest.raises(CheckpointStageError, match=r"x.ckpt is a 'ldm' checkpoint, not a stage-1 \(autoencoder\) one\. Train one"):
        require_stage({"ldm_stage": "ldm"}, "autoencoder", "x.ckpt")
    with pytest.raises(CheckpointStageError, match=r"not a checkpoint written by ldm's train.py"):
        require_stage({}, "ldm", "x.ckpt")
    require_stage({"hyper_parameters": {"stage": "ldm"}}, "ldm", "x.ckpt")
