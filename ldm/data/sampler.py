"""A sampler and DataLoader whose order is a function of (seed, epoch) and that can resume mid-epoch.

A training run killed (or preempted) in the middle of an epoch and resumed from its checkpoint sees
exactly the samples, in the same order, that an uninterrupted run would have seen: the order of an
epoch does not depend on how many epochs this process has run, and the loader's state (epoch and
batches already consumed) goes into the checkpoint (Lightning saves and restores the `state_dict` of
any train DataLoader that has one). Under torch.distributed the sampler gives each rank its own
shard, as `DistributedSampler` does, so the trainer runs with `use_distributed_sampler=False`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def _distributed_rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[int]):
    """Indices of one epoch for this rank: shuffled by (seed, epoch) or in order, then sharded.

    Like `DistributedSampler`, the epoch's indices are padded by repetition (or, with `drop_last`,
    truncated) to a multiple of the world size, and rank r takes every world-size-th one from r.
    `skip(n)` makes the next iteration start after its first n indices. `rank` and `world_size` default
    to torch.distributed's, read when needed (the process group starts after the loader is built).
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if length < 1:
            raise ValueError(f"A sampler needs a non-empty dataset, got length {length}")
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip = 0

    def _rank_and_world(self) -> tuple[int, int]:
        rank, world = _distributed_rank_and_world()
        return (rank if self.rank is None else self.rank), (world if self.world_size is None else self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def skip(self, count: int) -> None:
        self._skip = count

    def _epoch_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            indices = torch.randperm(self.length, generator=generator).tolist()
        else:
            indices = list(range(self.length))
        _, world = self._rank_and_world()
        if self.drop_last:
            return indices[: self.length - self.length % world]
        padding = (-self.length) % world
        return indices + (indices * (padding // self.length + 1))[:padding]

    def __len__(self) -> int:
        _, world = self._rank_and_world()
        return self.length // world if self.drop_last else -(-self.length // world)

    def __iter__(self) -> Iterator[int]:
        rank, world = self._rank_and_world()
        start, self._skip = self._skip, 0
        return iter(self._epoch_indices()[rank::world][start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` with `state_dict` / `load_state_dict` for Lightning.

    The state is the epoch and the number of batches handed out in it. Lightning asks for it when it
    writes a checkpoint (after the batch it trained on), and gives it back before it iterates again on
    resume; the loader then skips the consumed samples by index, without loading them.
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._consumed = 0

    @property
    def resumable_sampler(self) -> ResumableSampler:
        return self.sampler  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Any]:
        sampler = self.resumable_sampler
        if self.generator is not None:  # worker seeds: a function of (seed, epoch), like the order
            self.generator.manual_seed(sampler.seed * 1_000_003 + sampler.epoch)
        self._consumed = sampler._skip // self.batch_size
        return self._count(super().__iter__())

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.resumable_sampler.epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved after the epoch's last batch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.resumable_sampler.set_epoch(epoch)
        self.resumable_sampler.skip(batches * self.batch_size)
        self._consumed = batches
