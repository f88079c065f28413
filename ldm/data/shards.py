"""Batches streamed from webdataset tar shards, with bad data skipped and counted.

A shard is a tar of samples ``KEY.ext`` (the layout img2dataset writes: ``KEY.jpg``, ``KEY.txt``,
``KEY.json``). :class:`ShardedDataset` reads them through a webdataset pipeline::

    shard URLs ─► per epoch: resampled with replacement, or a shuffled pass split over ranks, then workers
               ─► tar members grouped into samples ─► shuffle buffer ─► decoder (+ filters) ─► batches

The decoder (``ldm.data.laion.ImageTextDecoder``, ``ldm.data.latents.LatentDecoder``) turns a sample into
tensors or raises :class:`Rejected` with a reason. Nothing bad stops the stream: an unreadable shard, a
corrupt image, a missing caption are skipped and counted in whichever process reads them (a DataLoader
worker, usually), and the counts ride along in the next batch as ``batch["data_counts"]`` — plain ints
since that worker's previous batch — so the main process can sum them whatever the number of workers
(``ldm.training.callbacks.DataCountsLogger`` sums them over ranks and logs them).

With ``batches_per_epoch`` the stream has a fixed length: every DDP rank yields exactly that many batches
per epoch (spread over its workers), so no rank waits at a collective for another that ran out of data.
"""

from __future__ import annotations

import glob
import logging
import re
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any
from urllib.parse import urlparse

import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import IterableDataset

logger = logging.getLogger(__name__)

COUNT_KEYS: tuple[str, ...] = (
    "samples",           # decoded and passed the filters
    "shard_error",       # a shard could not be opened or read (missing, not a tar, truncated): what could not be read is skipped
    "bad_metadata",      # KEY.json is not a JSON object
    "no_caption",        # no caption, or an empty one
    "bad_caption",       # a caption that is not UTF-8 text
    "no_image",          # a sample without KEY.jpg/.jpeg/.png/.webp
    "corrupt_image",     # the image does not decode
    "no_latent",         # a latent-cache sample without its arrays
    "corrupt_latent",    # the arrays do not load or have the wrong shape
    "missing_metadata",  # a filter is set but KEY.json lacks its field
    "too_small",         # below min_width / min_height
    "low_aesthetic",     # below min_aesthetic
    "unsafe",            # punsafe above max_punsafe
    "watermark",         # pwatermark above max_pwatermark
    "short_caption",     # caption shorter than min_caption_length
)
"""Every count a batch can carry; ``samples`` is what came through, the others what was skipped and why."""

MAKE_SHARDS_HINT = (
    "Make shards with `python -m ldm.tools.make_shards IMAGES_DIR OUT_DIR --shard-size 1000` (a folder of "
    "images with .txt captions, or a CSV/Parquet of paths and captions), or with img2dataset "
    "(--output_format webdataset), then set the URLs to OUT_DIR (every .tar in it) or a pattern such as "
    "'data.urls=\"OUT_DIR/{00000..00009}.tar\"' (quoted: Hydra reads braces otherwise)."
)
SHARD_ERRORS_IN_A_ROW_LIMIT = 100
"""A stream that meets this many unreadable shards in a row, and no sample between them, stops."""


class NoShardsError(FileNotFoundError):
    """A shard pattern that matches nothing."""


class Rejected(Exception):
    """Raised by a decoder for a sample that is skipped; ``reason`` is one of :data:`COUNT_KEYS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in COUNT_KEYS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {COUNT_KEYS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def is_local(url: str) -> bool:
    """A plain path or a file: URL (rather than pipe:, s3://, https://, ...)."""
    return urlparse(url).scheme in ("", "file")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """The shard URLs of a pattern: braces expanded (``laion/{00000..04095}.tar``; ``a::b`` joins
    patterns), globs of local paths expanded (``laion/*.tar``), a local folder read as every ``.tar``
    in it, remote URLs (``pipe:``, ``s3://``, ``https://``) kept as given.

    Local shards that do not exist are dropped with a warning (img2dataset leaves gaps where a shard
    failed); when nothing is left this raises :class:`NoShardsError`, saying how to make shards.
    """
    patterns = [urls] if isinstance(urls, str) else [str(url) for url in urls]
    expanded = [url for pattern in patterns for url in wds.shardlists.expand_urls(pattern)]
    found: list[str] = []
    missing: list[str] = []
    for url in expanded:
        if not is_local(url):
            found.append(url)
            continue
        path = url.removeprefix("file://").removeprefix("file:")
        if glob.has_magic(path):
            found.extend(sorted(glob.glob(path)))
        elif os.path.isdir(path):
            found.extend(sorted(glob.glob(os.path.join(glob.escape(path), "*.tar"))))
        elif os.path.isfile(path):
            found.append(path)
        else:
            missing.append(path)
    if not found:
        shown = urls if isinstance(urls, str) else list(urls)
        raise NoShardsError(f"No shards match {shown!r} ({len(expanded)} paths after expanding braces, none exists). {MAKE_SHARDS_HINT}")
    if missing:
        logger.warning("%d of %d shards do not exist and are left out, e.g. %s", len(missing), len(expanded), missing[0])
    return found


class DataCounts:
    """What one reading process skipped and passed. ``take()`` hands over the counts since its last call
    (they travel in the next batch); ``totals`` keeps everything this process counted. The first few
    skips of each kind are logged with the sample's key and shard, the rest only counted."""

    WARN_FIRST = 5

    def __init__(self) -> None:
        self.pending: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        self.shard_errors_in_a_row = 0
        self._counted_inside: str | None = None

    def count(self, key: str, n: int = 1) -> None:
        self.pending[key] += n
        self.totals[key] += n

    def skip(self, reason: str, detail: str) -> None:
        self.count(reason)
        seen = self.totals[reason]
        if seen <= self.WARN_FIRST:
            more = f" (further '{reason}' skips are counted, not logged)" if seen == self.WARN_FIRST else ""
            logger.warning("skipping %s: %s%s", reason.replace("_", " "), detail, more)

    def shard_error(self, error: Exception) -> bool:
        """webdataset's error handler for opening and reading tars: count, and go on with the next.

        A tar cut off inside a member reaches the handler twice: from the member reader (its message
        ending in " @ <stream name='...'>", no URL) and again from the shard expander (the URL appended to
        its args). It is one bad shard: counted at the first call, under the name read from the stream."""
        message = str(error.args[0]) if error.args else ""
        url = next((arg for arg in reversed(error.args[1:]) if isinstance(arg, str)), None)
        if url is None:
            stream = re.search(r" @ .*name='([^']+)'", message)
            self._counted_inside = stream.group(1) if stream else None
            url = self._counted_inside or "an unnamed stream"
        elif self._counted_inside is not None and url.removeprefix("file:").removeprefix("//") == self._counted_inside:
            self._counted_inside = None
            return True
        else:
            self._counted_inside = None
        self.skip("shard_error", f"{url}: {type(error).__name__}: {message}")
        self.shard_errors_in_a_row += 1
        if self.shard_errors_in_a_row >= SHARD_ERRORS_IN_A_ROW_LIMIT:
            raise RuntimeError(
                f"{self.shard_errors_in_a_row} shards in a row could not be read (the last: {error}); "
                "check the shard URLs and access to them."
            ) from error
        return True

    def take(self) -> dict[str, int]:
        taken = dict(self.pending)
        self.pending.clear()
        return taken


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Tensors stacked, everything else (captions, keys, metadata) as lists."""
    first = samples[0]
    return {key: torch.stack([s[key] for s in samples]) if isinstance(first[key], Tensor) else [s[key] for s in samples]
            for key in first}


Decoder = Callable[[dict[str, Any]], dict[str, Any]]


class ShardedDataset(IterableDataset):
    """Batches (dicts) decoded by ``decoder`` from the samples of tar shards at ``urls``.

    ``resampled``: every (rank, worker) draws shards with replacement, from its own seed, forever;
    otherwise each epoch is a pass over the shards in an order shuffled per epoch (``shard_shuffle``),
    split disjointly over ranks, then over DataLoader workers. ``shuffle_buffer`` samples are mixed
    across shards before decoding. ``batches_per_epoch`` fixes the epoch length of each rank (a pass
    that ends early starts over); None makes one pass, with the last batch partial unless ``drop_last``.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        decoder: Decoder,
        batch_size: int,
        batches_per_epoch: int | None = None,
        resampled: bool = False,
        shard_shuffle: bool = True,
        shuffle_buffer: int = 0,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be positive or None, got {batches_per_epoch}")
        if resampled and batches_per_epoch is None:
            raise ValueError("resampled shards are endless: set batches_per_epoch")
        self.urls = expand_urls(urls)
        self.decoder = decoder
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.resampled = resampled
        self.shard_shuffle = shard_shuffle
        self.shuffle_buffer = shuffle_buffer
        self.drop_last = drop_last
        self.seed = seed
        self.rank: int | None = None
        self.world_size: int | None = None
        self.counts = DataCounts()
        self.epoch = -1

    def distribute(self, rank: int, world_size: int) -> None:
        """Fixes this process's rank. Recorded here, in the main process, rather than read in the workers,
        where ``torch.distributed`` is not initialised when they are spawned instead of forked."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("one pass over shards has no length known in advance")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.epoch += 1
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.rank is not None:
            rank, world_size = self.rank, self.world_size
        pipeline = wds.DataPipeline(
            *self._shard_stages(rank, world_size, worker),
            wds.tarfile_to_samples(handler=self.counts.shard_error),
            self._shuffle_stage(rank, worker),
            self._decode,
            wds.batched(self.batch_size, collation_fn=self._collate, partial=not self.drop_last),
        )
        if self.batches_per_epoch is None:
            return iter(pipeline)
        share = self.batches_per_epoch // num_workers + int(worker < self.batches_per_epoch % num_workers)
        return self._exactly(pipeline.with_epoch(nbatches=share), share, f"rank {rank}, worker {worker}")

    def _shard_stages(self, rank: int, world_size: int, worker: int) -> list[Any]:
        if self.resampled:
            return [wds.ResampledShards(self.urls, seed=wds.utils.make_seed(self.seed, self.epoch), deterministic=True,
                                        worker_seed=lambda: wds.utils.make_seed(rank, worker))]
        order = list(self.urls)
        if self.shard_shuffle:
            random.Random(wds.utils.make_seed(self.seed, self.epoch)).shuffle(order)  # the same order on every rank
        # split by node as wds.split_by_node does, with the rank from distribute() rather than read in the worker
        return [wds.SimpleShardList(order), lambda shards: islice(shards, rank, None, world_size), wds.split_by_worker]

    def _shuffle_stage(self, rank: int, worker: int) -> Callable | None:
        if self.shuffle_buffer <= 1:
            return None
        rng = random.Random(wds.utils.make_seed(self.seed, self.epoch, rank, worker))
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)

    def _decode(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            self.counts.shard_errors_in_a_row = 0
            try:
                decoded = self.decoder(sample)
            except Rejected as rejected:
                self.counts.skip(rejected.reason, f"{sample.get('__key__')} in {sample.get('__url__')}: {rejected.detail}")
                continue
            self.counts.count("samples")
            yield decoded

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(samples)
        batch["data_counts"] = self.counts.take()
        return batch

    def _exactly(self, batches: Iterable[dict[str, Any]], expected: int, who: str) -> Iterator[dict[str, Any]]:
        produced = 0
        for batch in batches:
            produced += 1
            yield batch
        if produced < expected:
            raise RuntimeError(
                f"{who}: a whole pass over its shards gave {produced} of {expected} batches; no sample came through "
                f"(counts: {dict(self.counts.totals)}). Check the data and the filters."
            )
