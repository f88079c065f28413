"""Making small webdataset shards for tests: real PNG/JPEG bytes, captions, metadata, and bad samples."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image


def pixels(seed: int, width: int = 32, height: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def corrupt_jpeg(seed: int = 0) -> bytes:
    """A JPEG cut in half: the header opens, the full decode fails."""
    data = encode(pixels(seed, 64, 64), "JPEG")
    return data[: len(data) // 2]


def good_sample(key: str, seed: int, size: int = 32, **metadata: Any) -> dict[str, Any]:
    return {"__key__": key, "png": encode(pixels(seed, size, size)), "txt": f"caption {key}",
            "json": {"width": size, "height": size, **metadata}}


def write_shard(path: Path, samples: list[dict[str, Any]]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def write_good_shards(root: Path, shards: int, per_shard: int, size: int = 32) -> list[str]:
    """``root/00000.tar ...`` of good samples keyed ``s<shard>_<i>``; returns every key."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(shards):
        samples = [good_sample(f"s{shard}_{i}", seed=shard * 1000 + i, size=size) for i in range(per_shard)]
        write_shard(root / f"{shard:05d}.tar", samples)
        keys += [s["__key__"] for s in samples]
    return keys
