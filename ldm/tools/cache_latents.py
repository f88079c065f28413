"""Encode image shards once into a latent cache for ``python train.py stage=ldm data=latents``.

    python -m ldm.tools.cache_latents urls=shards out=cache \\
        autoencoder_ckpt=runs/autoencoder/<run>/checkpoints/last.ckpt text_encoder=tiny image_size=32

Reads the shards once, in order (centre crops, no flips), runs the frozen autoencoder (the posterior's
mean and std, so training still samples) and the text encoder over every sample that decodes and
has a caption, and writes ``out/00000.tar, ...`` with ``KEY.mean.npy``, ``KEY.std.npy``,
``KEY.context.npy``, ``KEY.txt`` and ``KEY.json`` (the source metadata, with the image's size), plus
``out/latents.json``: the shapes, the counts, and which autoencoder and text encoder made the cache
(hashes of their weights), which a training run checks against its own. The format is described in
``ldm/data/latents.py``; the config in ``configs/cache_latents.yaml``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ldm.checkpoints import load_autoencoder, state_dict_sha256
from ldm.data.laion import ImageTextDecoder
from ldm.data.latents import write_manifest
from ldm.data.shards import ShardedDataset
from ldm.errors import LdmError

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
DTYPES = {"float32": np.float32, "float16": np.float16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def _encode(batch: dict[str, Any], autoencoder: nn.Module, text_encoder: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    posterior = autoencoder.encode(batch["image"].to(device).float())
    return {"mean": posterior.mean, "std": posterior.std, "context": text_encoder(batch["caption"]).float()}


def cache_latents(cfg: DictConfig) -> dict[str, Any]:
    """Writes the cache described by ``cfg`` (configs/cache_latents.yaml); returns its manifest."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    out = Path(cfg.out)
    if any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds shards: give a new folder as out=, or delete them first.")
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    autoencoder = load_autoencoder(cfg.autoencoder_ckpt).to(device).eval().requires_grad_(False)
    text_encoder = hydra.utils.instantiate(cfg.text_encoder).to(device).eval()
    decoder = ImageTextDecoder(cfg.image_size, random_crop=False, hflip=False, caption_key=cfg.caption_key)
    dataset = ShardedDataset(cfg.urls, decoder, cfg.batch_size, shard_shuffle=False, drop_last=False)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)
    dtype = DTYPES[cfg.dtype]

    counts: Counter[str] = Counter()
    shapes: dict[str, list[int]] = {}
    written = 0
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=cfg.shard_size, verbose=0) as sink, \
            tqdm(unit="img", desc="cache_latents") as bar:
        for batch in loader:
            counts.update(batch["data_counts"])
            arrays = {name: tensor.cpu().numpy().astype(dtype) for name, tensor in _encode(batch, autoencoder, text_encoder, device).items()}
            shapes = {name: list(array.shape[1:]) for name, array in arrays.items()}
            for i, key in enumerate(batch["key"]):
                sink.write({"__key__": key, **{f"{name}.npy": array[i] for name, array in arrays.items()},
                            "txt": batch["caption"][i], "json": batch["metadata"][i]})
            written += len(batch["key"])
            bar.update(len(batch["key"]))
        shards = sink.shard
    if written == 0:
        raise RuntimeError(f"Nothing to cache: no sample of {cfg.urls} decoded with a caption (counts: {dict(counts)}).")

    manifest = {
        "samples": written,
        "shards": [f"{index:05d}.tar" for index in range(shards)],
        "shapes": shapes,
        "dtype": cfg.dtype,
        "image_size": cfg.image_size,
        "source": cfg.urls if isinstance(cfg.urls, str) else OmegaConf.to_container(cfg.urls),
        "skipped": {key: value for key, value in counts.items() if key != "samples"},
        "autoencoder": {"sha256": state_dict_sha256(autoencoder), "checkpoint": str(Path(cfg.autoencoder_ckpt).resolve()),
                        "downsample_factor": autoencoder.downsample_factor},
        "text_encoder": {"sha256": state_dict_sha256(text_encoder), "config": OmegaConf.to_container(cfg.text_encoder, resolve=True)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = write_manifest(out, manifest)
    skipped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in manifest["skipped"].items()) or "nothing"
    log.info("Cached %d samples in %d shards (%s); skipped: %s. Manifest: %s", written, shards, cfg.dtype, skipped, path)
    log.info("Train on them with: python train.py stage=ldm data=latents data.urls=%s autoencoder_ckpt=%s", out, cfg.autoencoder_ckpt)
    return manifest


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="cache_latents")
def main(cfg: DictConfig) -> None:
    try:
        cache_latents(cfg)
    except (LdmError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
