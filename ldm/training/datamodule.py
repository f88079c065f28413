"""LightningDataModules: any map-style or iterable dataset of {"image", "caption"} samples, and batches
streamed from tar shards (images, or a latent cache)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.datamodule import build_dataloader
from ldm.data.laion import ImageTextDecoder, MetadataFilter
from ldm.data.latents import LatentDecoder, manifest_path_for, read_manifest
from ldm.data.shards import ShardedDataset
from ldm.errors import ConfigError

log = logging.getLogger(__name__)
# ShardedDataset's __len__ is exact: each worker yields its own share of batches from its own shards.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


class ImageCaptionDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train: Dataset,
        val: Dataset | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        """Refuses, before training starts, a training set that cannot fill one batch per rank (training
        drops the last, partial batch, so such a run would train nothing and end as if it had)."""
        if stage not in (None, "fit") or isinstance(self.train_set, IterableDataset):
            return
        world_size = self.trainer.world_size if self.trainer is not None else 1
        per_rank = len(self.train_set) // world_size
        if per_rank < self.batch_size:
            raise ConfigError(
                f"The training set has {len(self.train_set)} images, {per_rank} per rank over {world_size} rank(s): fewer than one "
                f"batch of data.batch_size={self.batch_size}, so nothing would train. Lower data.batch_size or add data."
            )

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        shuffle = train and not isinstance(dataset, IterableDataset)
        return build_dataloader(dataset, batch_size, shuffle=shuffle, num_workers=self.num_workers, seed=self.seed,
                                drop_last=train, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, train=False)


class ShardDataModule(pl.LightningDataModule):
    """Batches from webdataset shards (``ldm.data.shards.ShardedDataset``), decoded by ``decoder``.

    Training streams ``urls`` with a fixed ``batches_per_epoch`` per rank; validation, if ``val_urls``
    is set, makes one deterministic pass over them (centre crops, no flips, no shuffling), split over
    ranks. A pattern that matches no shard fails here, at construction. Each batch carries the skip
    counts of its worker in ``batch["data_counts"]`` (see ``DataCountsLogger``).
    """

    def __init__(
        self,
        urls: str | list[str],
        decoder: ImageTextDecoder | LatentDecoder,
        batch_size: int = 32,
        val_urls: str | list[str] | None = None,
        num_workers: int = 4,
        batches_per_epoch: int = 1000,
        resampled: bool = True,
        shard_shuffle: bool = True,
        shuffle_buffer: int = 1000,
        filters: MetadataFilter | None = None,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        decoder = decoder.with_filters(filters)
        self.train_set = ShardedDataset(urls, decoder, batch_size, batches_per_epoch=batches_per_epoch, resampled=resampled,
                                        shard_shuffle=shard_shuffle, shuffle_buffer=shuffle_buffer, drop_last=True, seed=seed)
        self.val_set = None
        if val_urls:
            self.val_set = ShardedDataset(val_urls, decoder.for_validation(), batch_size, shard_shuffle=False, drop_last=False)
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def setup(self, stage: str | None = None) -> None:
        rank, world_size = self._rank_and_world_size()
        self.train_set.distribute(rank, world_size)
        if self.val_set is not None:
            # Every rank must validate at least one batch (or it would miss the metric sync): with fewer
            # validation shards than ranks, each rank validates all of them.
            split = len(self.val_set.urls) >= world_size
            self.val_set.distribute(rank if split else 0, world_size if split else 1)
        consumers = world_size * max(1, self.num_workers)
        if not self.train_set.resampled and len(self.train_set.urls) < consumers:
            raise ValueError(
                f"{len(self.train_set.urls)} shards cannot be split over {world_size} rank(s) x {max(1, self.num_workers)} "
                "worker(s) without leaving some with none: use data.resampled=true, fewer workers, or more shards "
                "(`python -m ldm.tools.make_shards ... --shard-size` smaller)."
            )

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _loader(self, dataset: ShardedDataset) -> DataLoader:
        # Batches are made in the pipeline (batch_size=None here), so a batch never mixes workers.
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set)


class LatentCacheDataModule(ShardDataModule):
    """A :class:`ShardDataModule` over a latent cache (``python -m ldm.tools.cache_latents``).

    ``latent_cache`` is the cache's manifest: the stage-2 module checks at the start of fit that the
    cache was made by its own autoencoder and text encoder. ``manifest`` defaults to ``latents.json``
    beside the first shard.
    """

    def __init__(self, urls: str | list[str], decoder: LatentDecoder, manifest: str | None = None, **kwargs: Any) -> None:
        path = manifest or manifest_path_for(urls)
        self.latent_cache = read_manifest(path)
        shapes = {name: tuple(shape) for name, shape in self.latent_cache["shapes"].items()}
        super().__init__(urls, decoder.with_shapes(shapes), **kwargs)
        log.info("Latent cache %s: %d samples, latents %s, text embeddings %s", path, self.latent_cache["samples"],
                 shapes["mean"], shapes["context"])
