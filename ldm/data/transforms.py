"""Image preparation shared by the datasets: PIL in, ``3 x H x W`` float32 in [-1, 1] out."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def uint8_to_model_range(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``3 x H x W`` float32 in [-1, 1].

    Done in numpy: single-threaded, so it stays cheap where many processes share few cores.
    """
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(chw / np.float32(127.5) - np.float32(1.0))


def to_rgb(image: Image.Image, matte: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB version of ``image``; transparent pixels are composited over ``matte`` rather than revealing
    whatever colour happens to be stored under them."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    composed = Image.new("RGBA", rgba.size, (*matte, 255))
    composed.alpha_composite(rgba)
    return composed.convert("RGB")


def resize_and_crop(
    image: Image.Image,
    size: int,
    random_crop: bool = False,
    generator: torch.Generator | None = None,
) -> Image.Image:
    """Scale so the shorter side is ``size`` (antialiased bicubic), then cut a ``size x size`` square:
    the centre one, or with ``random_crop`` one at a position drawn from ``generator`` (torch's global
    generator when None, which DataLoader seeds per worker)."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    if random_crop:
        left = int(torch.randint(new_width - size + 1, (1,), generator=generator))
        top = int(torch.randint(new_height - size + 1, (1,), generator=generator))
    else:
        left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))
