"""Image-caption samples in the layout img2dataset writes: ``KEY.jpg|.png|.webp``, ``KEY.txt``, ``KEY.json``.

:class:`MetadataFilter` drops samples by their JSON metadata (size, aesthetic score, ``punsafe``,
``pwatermark``) and caption length before anything is decoded; :class:`ImageTextDecoder` decodes the
image into ``3 x size x size`` float32 in [-1, 1] (resize the short side, centre or random crop,
optional horizontal flip). Both raise :class:`ldm.data.shards.Rejected` for what they skip.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.folder import DECODE_ERRORS
from ldm.data.shards import Rejected
from ldm.data.transforms import resize_and_crop, to_rgb, uint8_to_model_range

IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


def read_metadata(sample: dict[str, Any]) -> dict[str, Any]:
    """``KEY.json`` as a dict; {} when the sample has none."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        metadata = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Rejected("bad_metadata", f"KEY.json does not parse: {error}") from error
    if not isinstance(metadata, dict):
        raise Rejected("bad_metadata", f"KEY.json is a {type(metadata).__name__}, not an object")
    return metadata


def read_caption(sample: dict[str, Any], metadata: dict[str, Any], caption_key: str) -> str:
    """The caption: the sample member ``caption_key`` (``txt``, or e.g. ``blip.txt``), or with a
    ``json.`` prefix a field of the metadata (``json.caption``)."""
    if caption_key.startswith("json."):
        value = metadata.get(caption_key.removeprefix("json."))
        caption = value if isinstance(value, str) else ""
    else:
        raw = sample.get(caption_key)
        try:
            caption = raw.decode("utf-8") if isinstance(raw, bytes) else ""
        except UnicodeDecodeError as err:
            raise Rejected("bad_caption", f"'{caption_key}' is not UTF-8 ({err.reason} at byte {err.start})") from None
    caption = caption.strip()
    if not caption:
        raise Rejected("no_caption", f"no caption under '{caption_key}'")
    return caption


@dataclass
class MetadataFilter:
    """Thresholds on a sample's metadata; None (or 0) turns a filter off.

    The size is read from the JSON fields ``width_key``/``height_key`` (img2dataset's ``width``/``height``
    are those of the stored image; ``original_width``/``original_height`` those before its resize) and,
    where they are missing, from the image itself. A threshold set on a field the JSON lacks drops
    the sample (``missing_metadata``): it cannot be shown to pass.
    """

    min_width: int = 0
    min_height: int = 0
    min_caption_length: int = 0
    min_aesthetic: float | None = None
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    aesthetic_key: str = "aesthetic"
    width_key: str = "width"
    height_key: str = "height"

    @property
    def checks_size(self) -> bool:
        return self.min_width > 0 or self.min_height > 0

    def size_from(self, metadata: dict[str, Any]) -> tuple[int, int] | None:
        width, height = metadata.get(self.width_key), metadata.get(self.height_key)
        if isinstance(width, (int, float)) and isinstance(height, (int, float)):
            return int(width), int(height)
        return None

    def check_size(self, width: int, height: int) -> None:
        if width < self.min_width or height < self.min_height:
            raise Rejected("too_small", f"{width}x{height} is below {self.min_width}x{self.min_height}")

    def check(self, metadata: dict[str, Any], caption: str) -> None:
        """Raises Rejected for the first threshold the sample fails (the size only if the JSON has it)."""
        if len(caption) < self.min_caption_length:
            raise Rejected("short_caption", f"{len(caption)} characters, fewer than {self.min_caption_length}")
        size = self.size_from(metadata)
        if size is not None and self.checks_size:
            self.check_size(*size)
        if self.min_aesthetic is not None and self._number(metadata, self.aesthetic_key) < self.min_aesthetic:
            raise Rejected("low_aesthetic", f"{self.aesthetic_key}={metadata[self.aesthetic_key]} < {self.min_aesthetic}")
        if self.max_punsafe is not None and self._number(metadata, "punsafe") > self.max_punsafe:
            raise Rejected("unsafe", f"punsafe={metadata['punsafe']} > {self.max_punsafe}")
        if self.max_pwatermark is not None and self._number(metadata, "pwatermark") > self.max_pwatermark:
            raise Rejected("watermark", f"pwatermark={metadata['pwatermark']} > {self.max_pwatermark}")

    @staticmethod
    def _number(metadata: dict[str, Any], key: str) -> float:
        value = metadata.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise Rejected("missing_metadata", f"a filter needs a number under '{key}' in KEY.json, got {value!r}")
        return float(value)


class ImageTextDecoder:
    """A shard sample -> ``{"image": 3 x size x size float32 in [-1, 1], "caption", "key", "metadata"}``.

    ``metadata`` is the sample's JSON with the image's ``width``/``height`` filled in when absent.
    JPEGs are decoded at a reduced scale when they are much larger than ``size`` (Pillow's draft
    mode). Random crops and flips draw from torch's generator, which the DataLoader seeds per worker.
    """

    def __init__(
        self,
        size: int,
        random_crop: bool = True,
        hflip: bool = False,
        caption_key: str = "txt",
        filters: MetadataFilter | None = None,
    ) -> None:
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {size}")
        self.size = size
        self.random_crop = random_crop
        self.hflip = hflip
        self.caption_key = caption_key
        self.filters = filters or MetadataFilter()

    def with_filters(self, filters: MetadataFilter | None) -> "ImageTextDecoder":
        return ImageTextDecoder(self.size, self.random_crop, self.hflip, self.caption_key, filters)

    def for_validation(self) -> "ImageTextDecoder":
        """The same decoding, deterministic: centre crops, no flips."""
        return ImageTextDecoder(self.size, False, False, self.caption_key, dataclasses.replace(self.filters))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        metadata = read_metadata(sample)
        caption = read_caption(sample, metadata, self.caption_key)
        self.filters.check(metadata, caption)
        image, width, height = self._decode(sample, metadata)
        metadata.setdefault("width", width)
        metadata.setdefault("height", height)
        return {"image": image, "caption": caption, "key": sample["__key__"], "metadata": metadata}

    def _decode(self, sample: dict[str, Any], metadata: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
        extension = next((key for key in IMAGE_KEYS if key in sample), None)
        if extension is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise Rejected("no_image", f"none of {'/'.join(IMAGE_KEYS)} among {members}")
        try:
            with Image.open(io.BytesIO(sample[extension])) as file:
                width, height = file.size
                if self.filters.checks_size and self.filters.size_from(metadata) is None:
                    self.filters.check_size(width, height)
                file.draft("RGB", (self.size, self.size))
                image = to_rgb(file)
                image.load()
        except DECODE_ERRORS as error:
            raise Rejected("corrupt_image", f"{extension}: {type(error).__name__}: {error}") from error
        image = resize_and_crop(image, self.size, random_crop=self.random_crop)
        if self.hflip and bool(torch.rand(()) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return uint8_to_model_range(np.asarray(image)), width, height
