"""Image files in and out of generation: inputs as tensors, outputs as PNGs that carry their settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from ldm.errors import SamplingInputError


def load_image(path: str | Path, size: tuple[int, int] | None, mode: str) -> Tensor:
    """An image file as a 1 x C x H x W tensor in [0, 1], resized to `size` (W, H) if given."""
    if not Path(path).is_file():
        raise SamplingInputError(f"{path} does not exist.")
    try:
        image = Image.open(path).convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise SamplingInputError(f"{path} is not an image that can be read ({err}).") from None
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS if mode == "RGB" else Image.Resampling.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (array.permute(2, 0, 1) if array.ndim == 3 else array[None])[None]


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(W, H) of an image file."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as err:
        raise SamplingInputError(f"{path} is not an image that can be read ({err}).") from None


def to_pil(image: Tensor) -> Image.Image:
    """C x H x W in [0, 1] -> 8-bit RGB."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def png_info(metadata: dict[str, Any]) -> PngInfo:
    """PNG text chunks: strings as they are, anything else as JSON."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    return info


def save_png(image: Tensor, path: Path, metadata: dict[str, Any]) -> None:
    to_pil(image).save(path, pnginfo=png_info(metadata))
