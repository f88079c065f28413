"""A catalogue of bad input, each given to the real entry point as a user would: the run stops (or goes on,
where a researcher would want it to) with one line naming the problem, no traceback, no payload run,
and nothing written before lost."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.training.run_lock import RunDirLock

REPO = str(Path(__file__).resolve().parents[1])

TINY_STAGE1 = ["stage=autoencoder", "image_size=32", "data.train.length=32", "data.val.length=8", "data.batch_size=8",
               "model.resolution=32", "loss/perceptual=none", "trainer.max_steps=2", "trainer.enable_progress_bar=false", "logger=csv"]
TINY_STAGE2 = ["stage=ldm", "image_size=32", "data.train.length=32", "data.val.length=8", "data.batch_size=8", "trainer.max_steps=2",
               "stage.module.scale_factor_batches=1", "trainer.enable_progress_bar=false", "logger=csv"]
PROMPT = "prompt=a red circle"


@dataclass
class Case:
    script: str
    args: list[str]
    message: str                      # a regex the one-line error must match
    exit_code: int | None = None      # None: any non-zero
    keep: list[Path] = field(default_factory=list)  # files that must come out byte-identical


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def _png(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    Image.fromarray(np.zeros((size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8).squeeze()).save(path)
    return path


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tiny_autoencoder_ckpt: str, tiny_ldm_ckpt: str) -> dict[str, tuple[Case, subprocess.CompletedProcess, dict]]:
    root = tmp_path_factory.mktemp("bad_inputs")
    init = _png(root / "init.png", (32, 32))
    mask = _png(root / "mask_other_size.png", (16, 32), "L")
    not_an_image = root / "not_an_image.png"
    not_an_image.write_text("this is text")
    empty = root / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = root / "truncated.ckpt"
    data = Path(tiny_ldm_ckpt).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    misfit = root / "misfit.ckpt"  # weights that do not fit the config stored beside them
    ckpt = torch.load(tiny_ldm_ckpt, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["model"]["model_channels"] = 64
    torch.save(ckpt, misfit)
    blocked = root / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the checkpoints folder should be")
    locked = root / "locked"
    (locked / "checkpoints").mkdir(parents=True)
    (locked / "checkpoints" / "last.ckpt").write_bytes(Path(tiny_autoencoder_ckpt).read_bytes())
    resumed_wrong = root / "resumed_wrong"
    (resumed_wrong / "checkpoints").mkdir(parents=True)
    (resumed_wrong / "checkpoints" / "last.ckpt").write_bytes(Path(tiny_ldm_ckpt).read_bytes())

    sample = lambda *args: [f"ckpt={tiny_ldm_ckpt}", "steps=2", *args]  # noqa: E731
    cases = {
        # train.py
        "dataset smaller than a batch": Case("train.py", [*TINY_STAGE1, "data.train.length=20", "data.batch_size=32", f"run_dir={root / 'small'}"],
                                             r"^error: The training set has 20 images, 20 per rank over 1 rank\(s\): fewer than one batch of data.batch_size=32"),
        "stage-1 image size": Case("train.py", [*TINY_STAGE1, "image_size=33", "model.resolution=33", f"run_dir={root / 'odd1'}"],
                                   r"^error: image_size=33: the autoencoder downsamples by 2"),
        "stage-2 image size": Case("train.py", [*TINY_STAGE2, "image_size=30", f"autoencoder_ckpt={tiny_autoencoder_ckpt}", f"run_dir={root / 'odd2'}"],
                                   r"^error: image_size=30: stage 2 needs a multiple of 4"),
        "stage 1 resumed from stage 2": Case("train.py", [*TINY_STAGE1, f"run_dir={resumed_wrong}"],
                                             r"^error: .*last.ckpt is a 'ldm' checkpoint, not a stage-1 \(autoencoder\) one",
                                             keep=[resumed_wrong / "checkpoints" / "last.ckpt"]),
        "stage 2 on a stage-2 autoencoder_ckpt": Case("train.py", [*TINY_STAGE2, f"autoencoder_ckpt={tiny_ldm_ckpt}", f"run_dir={root / 'wrong_ae'}"],
                                                      r"^error: .*is a 'ldm' checkpoint, not a stage-1 \(autoencoder\) one"),
        "unwritable checkpoints folder": Case("train.py", [*TINY_STAGE1, f"run_dir={blocked}"],
                                              r"^error: run_dir=.*blocked: cannot write checkpoints into .*blocked/checkpoints"),
        "a second run in a busy run_dir": Case("train.py", [*TINY_STAGE1, f"run_dir={locked}"],
                                               rf"^error: run_dir={locked} is in use by PID {os.getpid()} on host",
                                               keep=[locked / "checkpoints" / "last.ckpt"]),
        "truncated ckpt_path": Case("train.py", [*TINY_STAGE1, f"ckpt_path={truncated}", f"run_dir={root / 'trunc'}"],
                                    r"^error: .*truncated.ckpt is not a readable checkpoint \(truncated, corrupt or not a torch file\)"),
        "misspelled key": Case("train.py", [*TINY_STAGE1, "model.chanels=3"], r"Key 'chanels' is not in struct"),
        # sample.py
        "strength outside [0, 1]": Case("sample.py", ["ckpt=nope.ckpt", PROMPT, f"init_image={init}", "strength=1.5"],
                                        r"^error: strength=1.5: img2img strength must be in \[0, 1\]"),
        "init image that is not an image": Case("sample.py", sample(PROMPT, f"init_image={not_an_image}", "strength=0.5"),
                                                r"^error: .*not_an_image.png is not an image that can be read"),
        "no GPU for device=cuda": Case("sample.py", sample(PROMPT, "device=cuda"), r"^error: device=cuda, but no CUDA GPU is available here"),
        "negative guidance scale": Case("sample.py", sample(PROMPT, "guidance_scale=-1"), r"^error: guidance_scale=-1: guidance scale must be a finite number >= 0"),
        "mask of another size": Case("sample.py", sample(PROMPT, f"init_image={init}", f"mask={mask}"),
                                     r"^error: mask=.* is 16x32 but init_image=.* is 32x32: the mask must have the init image's size"),
        "empty checkpoint": Case("sample.py", [f"ckpt={empty}", PROMPT], r"^error: Checkpoint .*empty.ckpt is empty \(0 bytes\)"),
        "truncated checkpoint": Case("sample.py", [f"ckpt={truncated}", PROMPT], r"^error: .*truncated.ckpt is not a readable checkpoint"),
        "weights that do not fit the config": Case("sample.py", [f"ckpt={misfit}", PROMPT, "steps=2"],
                                                   r"^error: ckpt=.*misfit.ckpt: its weights do not fit the model config it carries"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
    before = {name: {path: _digest(path) for path in case.keep} for name, case in cases.items()}

    def run(item: tuple[str, Case]) -> tuple[str, subprocess.CompletedProcess]:
        name, case = item
        slug = re.sub(r"\W+", "_", name)
        extra = [f"out_dir={root / 'samples' / slug}", "progress=false"] if case.script == "sample.py" else []
        done = subprocess.run([sys.executable, case.script, *case.args, *extra], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        return name, done

    with RunDirLock(locked), ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(run, cases.items()))
    return {name: (cases[name], results[name], before[name]) for name in cases}


CASES = ["dataset smaller than a batch", "stage-1 image size", "stage-2 image size", "stage 1 resumed from stage 2",
         "stage 2 on a stage-2 autoencoder_ckpt", "unwritable checkpoints folder", "a second run in a busy run_dir", "truncated ckpt_path",
         "misspelled key", "strength outside [0, 1]", "init image that is not an image", "no GPU for device=cuda",
         "negative guidance scale", "mask of another size", "empty checkpoint", "truncated checkpoint", "weights that do not fit the config"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gets_one_line_and_loses_nothing(catalogue, name: str) -> None:
    case, done, before = catalogue[name]
    assert done.returncode != 0 if case.exit_code is None else done.returncode == case.exit_code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(case.message, done.stderr, re.MULTILINE), done.stderr[-3000:]
    for path, digest in before.items():
        assert _digest(path) == digest, f"{path} changed"


def test_the_catalogue_covers_every_case(catalogue) -> None:
    assert sorted(catalogue) == sorted(CASES)


# --- bad data: skipped and counted once, the run goes on ---------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_shard_cut_inside_a_member_is_one_shard_error_under_its_name(tmp_path: Path, caplog) -> None:
    from ldm.data.laion import ImageTextDecoder
    from ldm.data.shards import ShardedDataset

    members = [(f"{i:04d}.{ext}", data) for i in range(6) for ext, data in (("txt", b"a caption"), ("png", _png_bytes(i)))]
    whole = _tar(tmp_path / "whole.tar", members)
    with tarfile.open(whole) as tar:
        inside = next(m for m in tar.getmembers() if m.name == "0003.png").offset_data + 100  # mid-member
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:inside])
    dataset = ShardedDataset(str(tmp_path / "cut.tar"), ImageTextDecoder(size=16), 2, batches_per_epoch=2, resampled=False)
    with caplog.at_level("WARNING"):
        batches = list(dataset)
    assert len(batches) == 2
    assert dataset.counts.totals["shard_error"] == 1  # one cut shard, one count (it used to be two)
    errors = [r.getMessage() for r in caplog.records if "shard error" in r.getMessage()]
    assert errors and all(str(tmp_path / "cut.tar") in m for m in errors) and not any(": ?:" in m for m in errors)


def test_a_caption_that_is_not_utf8_is_skipped_and_counted(tmp_path: Path) -> None:
    from ldm.data.laion import ImageTextDecoder
    from ldm.data.shards import ShardedDataset

    members = [("0000.txt", "a caption".encode()), ("0000.png", _png_bytes(0)), ("0001.txt", b"caf\xe9 latin-1"), ("0001.png", _png_bytes(1)),
               ("0002.txt", "a third".encode()), ("0002.png", _png_bytes(2))]
    dataset = ShardedDataset(str(_tar(tmp_path / "s.tar", members)), ImageTextDecoder(size=16), 2, batches_per_epoch=1, resampled=False)
    batch = next(iter(dataset))
    assert batch["caption"] == ["a caption", "a third"] and batch["data_counts"]["bad_caption"] == 1


def test_a_folder_totals_unreadable_images_found_at_decode_time(tmp_path: Path, caplog) -> None:
    from ldm.data.folder import ImageFolderDataset

    for i in range(6):
        _png(tmp_path / f"{i}.png", (16, 16))
    good = (tmp_path / "0.png").read_bytes()
    (tmp_path / "bad_header.png").write_bytes(b"not a png")  # found at construction
    (tmp_path / "bad_body.png").write_bytes(good[:40] + b"\x00" * 20)  # passes verify? then fails to decode
    dataset = ImageFolderDataset(tmp_path, size=16, captions=None)
    for index in range(len(dataset)):
        dataset[index]
    assert dataset.skipped == 2
