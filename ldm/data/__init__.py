"""Datasets yielding ``{"image": 3 x H x W float in [-1, 1], "caption": str}`` and their loaders."""

from ldm.data.datamodule import build_dataloader
from ldm.data.folder import ImageFolderDataset
from ldm.data.shapes import DEFAULT_HOLDOUT, ShapesDataset, caption_from_attributes

__all__ = ["DEFAULT_HOLDOUT", "ImageFolderDataset", "ShapesDataset", "build_dataloader", "caption_from_attributes"]
