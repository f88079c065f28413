"""Resume a researcher can trust: data order, atomic checkpoints, ckpt_path=auto, NaN/Inf skip-and-count."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import hydra
import lightning.pytorch as pl
import pytest
import torch

from ldm.data import ResumableDataLoader, ResumableSampler, ShapesDataset, build_dataloader
from ldm.losses.autoencoder_loss import AutoencoderLoss
from ldm.training.callbacks import LastCheckpoint, RequeueOnSignal
from ldm.training.checkpointing import AtomicCheckpointIO, find_resume_checkpoint, temp_path_for
from ldm.training.nonfinite import NonFiniteGuard, NonFiniteLossError
from ldm.training.run import build_trainer, resolve_ckpt_path, train
from train_helpers import TINY_AUTOENCODER, compose_config

# --- data order -----------------------------------------------------------------------------


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        sampler = ResumableSampler(50, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 3) == order(0, 3)  # whatever ran before in this process
    assert sorted(order(0, 3)) == list(range(50))
    assert len({tuple(order(0, e)) for e in range(4)} | {tuple(order(1, 0))}) == 5


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_shards_partition_an_epoch_over_ranks(drop_last: bool) -> None:
    shards = [list(ResumableSampler(10, shuffle=True, seed=2, drop_last=drop_last, rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in shards} == {3 if drop_last else 4}
    assert all(len(s) == len(ResumableSampler(10, True, 2, drop_last, rank=0, world_size=3)) for s in shards)
    seen = [i for shard in shards for i in shard]
    if drop_last:
        assert len(set(seen)) == 9  # one sample of the epoch left out, none repeated
    else:
        assert set(seen) == set(range(10)) and len(seen) == 12  # padded by repetition, like DistributedSampler


def _captions(loader, batches: int | None = None) -> list[list[str]]:
    out = []
    for batch in loader:
        out.append(batch["caption"])
        if batches is not None and len(out) == batches:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loader_restored_mid_epoch_continues_exactly_where_the_saved_one_was(num_workers: int) -> None:
    dataset = ShapesDataset(size=8, length=40)
    reference = build_dataloader(dataset, batch_size=4, shuffle=True, seed=5, drop_last=True, num_workers=num_workers)
    assert isinstance(reference, ResumableDataLoader)
    epochs = []
    for epoch in range(2):
        reference.sampler.set_epoch(epoch)
        epochs.append(_captions(reference))
    assert epochs[0] != epochs[1]

    interrupted = build_dataloader(dataset, batch_size=4, shuffle=True, seed=5, drop_last=True, num_workers=num_workers)
    interrupted.sampler.set_epoch(1)
    assert _captions(interrupted, batches=3) == epochs[1][:3]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 3}

    resumed = build_dataloader(dataset, batch_size=4, shuffle=True, seed=5, drop_last=True, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert _captions(resumed) == epochs[1][3:]
    resumed.sampler.set_epoch(2)
    assert len(_captions(resumed)) == 10  # the next epoch is whole again


def test_a_loader_saved_after_the_last_batch_of_an_epoch_resumes_at_the_next_epoch() -> None:
    dataset = ShapesDataset(size=8, length=16)
    loader = build_dataloader(dataset, batch_size=4, shuffle=True, seed=0, drop_last=True)
    _captions(loader)
    resumed = build_dataloader(dataset, batch_size=4, shuffle=True, seed=0, drop_last=True)
    resumed.load_state_dict(loader.state_dict())
    expected = build_dataloader(dataset, batch_size=4, shuffle=True, seed=0, drop_last=True)
    expected.sampler.set_epoch(1)
    assert resumed.sampler.epoch == 1 and _captions(resumed) == _captions(expected)


# --- atomic checkpoints and ckpt_path=auto ------------------------------------------------------


def test_a_write_killed_midway_leaves_the_previous_last_ckpt_whole(tmp_path: Path, repo_root: str) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(3)}, last)
    # A second process writes a large checkpoint and is SIGKILLed after the first megabyte reaches the disk.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from ldm.training import checkpointing

        real_save = torch.save
        def dying_save(obj, f):
            real_save(obj, f)
            f.flush()
            os.truncate(f.fileno(), 1 << 20)  # what a write interrupted after 1 MiB leaves on disk
            os.kill(os.getpid(), signal.SIGKILL)
        checkpointing.torch.save = dying_save
        checkpointing.AtomicCheckpointIO().save_checkpoint({{"global_step": 2, "w": torch.zeros(4_000_000)}}, {str(last)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    leftovers = [p for p in last.parent.iterdir() if p != last]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.tmp-") and leftovers[0].stat().st_size == 1 << 20
    # last.ckpt is the complete old one, and resume picks it, never the truncated file.
    assert torch.load(last, weights_only=False)["global_step"] == 1
    assert resolve_ckpt_path("auto", tmp_path) == str(last)


def test_a_failed_write_removes_its_temporary_file_and_keeps_last(tmp_path: Path, monkeypatch) -> None:
    last = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, last)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2}, last)
    monkeypatch.undo()
    assert not temp_path_for(last).exists() and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(last, weights_only=False)["global_step"] == 1


def test_auto_resume_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert resolve_ckpt_path("auto", tmp_path) is None  # a fresh run
    io = AtomicCheckpointIO()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    io.save_checkpoint({"global_step": 5}, last)
    io.save_checkpoint({"global_step": 7}, hpc)  # SLURM's requeue signal came later
    os.utime(last, ns=(1_000_000_000, 1_000_000_000))
    assert find_resume_checkpoint(tmp_path) == hpc
    io.save_checkpoint({"global_step": 9}, last)  # the requeued job trained on
    (tmp_path / ".hpc_ckpt_2.ckpt.tmp-123").write_bytes(b"truncated")
    assert resolve_ckpt_path("auto", tmp_path) == str(last)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), tmp_path)


# --- NaN/Inf: skip and count, stop after K in a row ------------------------------------------------


def test_guard_skips_counts_resets_and_stops_after_k_in_a_row() -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    nan, inf, ok = torch.tensor(float("nan")), torch.tensor([1.0, float("inf")]), torch.tensor(0.5)
    assert [guard.check(x, step) for step, x in enumerate([ok, nan, inf, ok, nan, nan])] == [True, False, False, True, False, False]
    assert (guard.consecutive, guard.total_skipped) == (2, 4)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row .*max_nonfinite_steps"):
        guard.check(nan, 6)
    restored = NonFiniteGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert (restored.consecutive, restored.total_skipped) == (3, 5)


def test_guard_skips_on_every_rank_when_any_rank_is_non_finite() -> None:
    guard = NonFiniteGuard(max_consecutive=5)
    other_rank_nan = lambda flag: torch.minimum(flag, torch.tensor(0.0))  # noqa: E731 - a min over ranks, one of which is NaN
    assert not guard.check(torch.tensor(0.5), step=0, sync=other_rank_nan)
    assert guard.total_skipped == 1
    assert guard.check(torch.tensor(0.5), step=1, sync=lambda flag: flag)


def _nan_on_calls(calls: set[int], monkeypatch) -> None:
    """The autoencoder loss is NaN on these (0-based) calls, i.e. batches."""
    real = AutoencoderLoss.generator_loss
    count = iter(range(10**6))

    def generator_loss(self, *args):
        loss, logs = real(self, *args)
        return (loss * float("nan") if next(count) in calls else loss), logs

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", generator_loss)


def test_a_nan_step_is_skipped_counted_and_training_goes_on(tmp_path: Path, monkeypatch) -> None:
    _nan_on_calls({2, 3}, monkeypatch)
    cfg = compose_config(str(tmp_path), [*TINY_AUTOENCODER, "trainer.max_steps=6", "trainer.val_check_interval=6",
                                         "max_nonfinite_steps=3"])
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    # 8 batches: the 2 skipped ones are not steps, so the run still makes its 6 autoencoder steps.
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 8
    assert ckpt["generator_step"] == 6 and ckpt["nonfinite"] == {"consecutive": 0, "total_skipped": 2}
    assert int(next(iter(ckpt["optimizer_states"][0]["state"].values()))["step"]) == 6
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


def test_k_nan_steps_in_a_row_stop_the_run_with_a_clear_message(tmp_path: Path, monkeypatch) -> None:
    _nan_on_calls(set(range(1, 100)), monkeypatch)
    cfg = compose_config(str(tmp_path), [*TINY_AUTOENCODER, "trainer.max_steps=20", "trainer.val_check_interval=20",
                                         "max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf for 3 steps in a row \(last at step 1\)"):
        train(cfg)


# --- SLURM's time-limit signal (the real cluster is in test_slurm.py) --------------------------------


class _SignalAtBatch(pl.Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives in the middle of this batch


def test_sigusr1_stops_after_the_batch_writes_last_and_requeues(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records its arguments instead of talking to a cluster
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose_config(str(tmp_path / "run"), [*TINY_AUTOENCODER, "trainer.max_steps=20", "trainer.val_check_interval=20"])
    trainer = build_trainer(cfg, tmp_path / "run")
    last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    trainer.callbacks.extend([RequeueOnSignal(last), _SignalAtBatch(3)])
    trainer.fit(hydra.utils.instantiate(cfg.stage.module), datamodule=hydra.utils.instantiate(cfg.data))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["generator_step"] == 4  # batch 3 (0-based) finished, then the stop
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_resumed_run_appends_to_its_csv_metrics(tmp_path: Path) -> None:
    from ldm.training.loggers import CSVLogger

    first = CSVLogger(str(tmp_path), name="csv", version="")
    first.log_metrics({"train/loss": 1.0, "val/loss": 2.0}, step=0)
    first.log_metrics({"train/loss": 0.5}, step=1)
    first.save()
    resumed = CSVLogger(str(tmp_path), name="csv", version="")  # a new process, which has not validated yet
    resumed.log_metrics({"train/loss": 0.25, "lr": 0.1}, step=2)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["val/loss"], r["lr"]) for r in rows] == [
        ("0", "1.0", "2.0", ""), ("1", "0.5", "", ""), ("2", "0.25", "", "0.1")]
