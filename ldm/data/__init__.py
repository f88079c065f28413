"""Datasets yielding ``{"image": 3 x H x W float in [-1, 1], "caption": str}`` (shapes, emoji, folder) and their loaders; tar shards
streamed as batches (``shards``, ``laion``) and the latent cache format (``latents``)."""

from ldm.data.datamodule import build_dataloader
from ldm.data.sampler import ResumableDataLoader, ResumableSampler
from ldm.data.emoji import EmojiDataset
from ldm.data.folder import ImageFolderDataset
from ldm.data.laion import ImageTextDecoder, MetadataFilter
from ldm.data.latents import LatentDecoder
from ldm.data.shapes import DEFAULT_HOLDOUT, ShapesDataset, caption_from_attributes
from ldm.data.shards import ShardedDataset

__all__ = [
    "DEFAULT_HOLDOUT",
    "EmojiDataset",
    "ImageFolderDataset",
    "ImageTextDecoder",
    "LatentDecoder",
    "MetadataFilter",
    "ResumableDataLoader",
    "ResumableSampler",
    "ShapesDataset",
    "ShardedDataset",
    "build_dataloader",
    "caption_from_attributes",
]
