"""DataLoader construction shared by training and tools; the LightningDataModule lives in ldm.training."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.sampler import ResumableDataLoader, ResumableSampler


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffle order is a function of ``seed`` and the epoch alone.

    For a map-style dataset it is a `ResumableDataLoader`: sharded over torch.distributed ranks by its
    own sampler, and resumable mid-epoch from a checkpoint. An iterable dataset (webdataset) splits
    itself over ranks and workers and gets a plain DataLoader. Samples are dicts
    ``{"image": Tensor, "caption": str}``; the default collate turns a batch into
    ``{"image": B x 3 x H x W, "caption": list[str]}``. Workers persist across epochs so that the
    per-epoch cost is not a fresh process start (and a fork of a cached dataset) each time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    options = dict(num_workers=num_workers, generator=torch.Generator().manual_seed(seed), drop_last=drop_last,
                   pin_memory=pin_memory, persistent_workers=num_workers > 0)
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, **options)
    sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed, drop_last=drop_last)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, **options)
