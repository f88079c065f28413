"""A latent cache: shards of autoencoder posteriors and text embeddings, made once by
``python -m ldm.tools.cache_latents``, so that stage 2 trains without running either encoder per step.

Each sample holds ``KEY.mean.npy`` and ``KEY.std.npy`` (the posterior ``C x h x w``, unscaled: training
draws ``z = mean + std * eps`` and multiplies by its own scale factor), ``KEY.context.npy`` (the text
encoder's ``tokens x width`` embedding of the caption), ``KEY.txt`` and ``KEY.json`` (the source
metadata, with the image's width and height). Beside the shards, ``latents.json`` (the manifest)
records which autoencoder and text encoder made them, by a hash of their weights, so that a run with
other encoders refuses the cache instead of training on latents it would decode wrongly.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.data.laion import MetadataFilter, read_caption, read_metadata
from ldm.data.shards import Rejected, expand_urls, is_local
from ldm.errors import LdmError

FORMAT = "ldm-latent-cache/1"
MANIFEST_NAME = "latents.json"
ARRAYS: tuple[str, ...] = ("mean", "std", "context")
BATCH_KEYS: dict[str, str] = {"mean": "latent_mean", "std": "latent_std", "context": "context"}
"""Array name in a shard -> key in a batch."""


class LatentCacheMismatchError(LdmError, ValueError):
    """The cache was made by other encoders than the run's."""


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps({"format": FORMAT, **manifest}, indent=2) + "\n", encoding="utf-8")
    return path


def manifest_path_for(urls: str | list[str]) -> Path:
    """``latents.json`` beside the first local shard of ``urls``."""
    first = expand_urls(urls)[0]
    if not is_local(first):
        raise FileNotFoundError(
            f"The latent cache's shards are remote ({first}); copy its {MANIFEST_NAME} locally and set data.manifest=PATH."
        )
    return Path(first).parent / MANIFEST_NAME


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No latent cache manifest at {path}. It is written beside the shards by "
            "`python -m ldm.tools.cache_latents`; pass data.manifest=PATH if it lives elsewhere."
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a latent cache manifest of format {FORMAT!r} (format: {manifest.get('format')!r})")
    return manifest


def require_same_encoders(manifest: dict[str, Any], autoencoder_sha256: str, text_encoder_sha256: str,
                          autoencoder_source: str | None = None) -> None:
    """Raises LatentCacheMismatchError unless the cache's encoders are those given (by weight hash)."""
    made_by = manifest["autoencoder"]
    if made_by["sha256"] != autoencoder_sha256:
        raise LatentCacheMismatchError(
            f"The latent cache was made by another autoencoder (weights sha256 {made_by['sha256'][:12]}…, from "
            f"{made_by.get('checkpoint')}) than this run's ({autoencoder_sha256[:12]}…, from {autoencoder_source}). "
            f"Its latents would be decoded by the wrong decoder: train with autoencoder_ckpt={made_by.get('checkpoint')}, "
            "or re-make the cache with `python -m ldm.tools.cache_latents autoencoder_ckpt=<this run's>`."
        )
    text = manifest["text_encoder"]
    if text["sha256"] != text_encoder_sha256:
        raise LatentCacheMismatchError(
            f"The latent cache's text embeddings come from another text encoder (weights sha256 {text['sha256'][:12]}…, "
            f"config {text.get('config')}) than this run's ({text_encoder_sha256[:12]}…): sampling would condition "
            "differently from training. Use the same text_encoder config, or re-make the cache with this one."
        )


def _array(sample: dict[str, Any], name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
    raw = sample.get(f"{name}.npy")
    if raw is None:
        raise Rejected("no_latent", f"no KEY.{name}.npy")
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise Rejected("corrupt_latent", f"KEY.{name}.npy does not load: {error}") from error
    if shape is not None and tuple(array.shape) != shape:
        raise Rejected("corrupt_latent", f"KEY.{name}.npy has shape {tuple(array.shape)}, the cache's is {shape}")
    return torch.from_numpy(array.astype(np.float32, copy=False))


class LatentDecoder:
    """A latent-cache sample -> ``{"latent_mean", "latent_std", "context", "caption", "key", "metadata"}``.

    ``shapes`` (array name -> shape, from the manifest) rejects arrays of another shape, which would
    otherwise stop the batch from stacking.
    """

    def __init__(self, caption_key: str = "txt", filters: MetadataFilter | None = None,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        self.caption_key = caption_key
        self.filters = filters or MetadataFilter()
        self.shapes = dict(shapes or {})

    def with_filters(self, filters: MetadataFilter | None) -> "LatentDecoder":
        return LatentDecoder(self.caption_key, filters, self.shapes)

    def with_shapes(self, shapes: dict[str, tuple[int, ...]]) -> "LatentDecoder":
        return LatentDecoder(self.caption_key, self.filters, shapes)

    def for_validation(self) -> "LatentDecoder":
        return LatentDecoder(self.caption_key, dataclasses.replace(self.filters), self.shapes)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        metadata = read_metadata(sample)
        caption = read_caption(sample, metadata, self.caption_key)
        self.filters.check(metadata, caption)
        arrays = {BATCH_KEYS[name]: _array(sample, name, self.shapes.get(name)) for name in ARRAYS}
        return {**arrays, "caption": caption, "key": sample["__key__"], "metadata": metadata}
