"""Your own images: a folder tree of jpg/png/webp/bmp files with captions.

A bad file never stops a run. Construction opens every file and runs Pillow's cheap ``verify()``
(header and, for PNG, chunk checksums), dropping and counting what fails. Damage that only a full
decode finds (a truncated JPEG) is caught when the sample is loaded: the file is flagged in a
shared-memory tensor, so that the count is the same in the main process as in the DataLoader worker
that hit it, its warning is logged once, and the next readable image is returned in its place so
batches keep their size.
"""

from __future__ import annotations

import csv
import json
import logging
import struct
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.transforms import resize_and_crop, to_rgb, uint8_to_model_range

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
_FILENAME_KEYS = ("file_name", "filename", "file", "image", "path")
_CAPTION_KEYS = ("caption", "text")


def find_images(root: Path) -> list[Path]:
    """Every file below ``root`` with an image extension (any case), sorted for a stable order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_caption_file(path: Path) -> dict[str, str]:
    """``{filename: caption}`` from a .csv / .tsv (two columns, optional header row) or a .jsonl file
    (one object a line with a ``file_name``/``filename``/``file``/``image``/``path`` and a
    ``caption``/``text`` key). Filenames are relative to the image root."""
    suffix = path.suffix.lower()
    captions: dict[str, str] = {}
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                name = next((record[key] for key in _FILENAME_KEYS if key in record), None)
                caption = next((record[key] for key in _CAPTION_KEYS if key in record), None)
                if name is None or caption is None:
                    raise ValueError(f"{path}:{number}: needs one of {_FILENAME_KEYS} and one of {_CAPTION_KEYS}")
                captions[str(name)] = str(caption)
        return captions
    if suffix not in (".csv", ".tsv"):
        raise ValueError(f"caption file must be .csv, .tsv or .jsonl, got {path.name}")
    with path.open(encoding="utf-8", newline="") as table:
        rows = csv.reader(table, delimiter="\t" if suffix == ".tsv" else ",")
        for number, row in enumerate(rows, start=1):
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{number}: expected filename and caption, got {row!r}")
            if number == 1 and row[0].strip().lower() in _FILENAME_KEYS and row[1].strip().lower() in _CAPTION_KEYS:
                continue
            captions[row[0].strip()] = row[1].strip()
    return captions


def _verifies(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except DECODE_ERRORS as error:
        logger.warning("skipping unreadable image %s: %s", path, error)
        return False
    return True


class ImageFolderDataset(Dataset):
    """Images found recursively under ``root``; sample ``i`` is ``{"image": 3 x size x size float in
    [-1, 1], "caption": str}``.

    ``captions``: ``"sidecar"`` reads ``NAME.txt`` beside ``NAME.jpg``; a path names a .csv / .tsv /
    .jsonl file of (filename relative to ``root``, caption); None gives every image ``default_caption``.
    An image without a caption gets ``default_caption`` and is counted in ``missing_captions``.
    ``skipped`` counts unreadable images (at construction and, across workers, since).
    ``hflip`` mirrors half the images: leave it off when captions say "left" or "right".
    """

    def __init__(
        self,
        root: str | PathLike[str],
        size: int,
        captions: str | PathLike[str] | None = "sidecar",
        default_caption: str = "",
        random_crop: bool = False,
        hflip: bool = False,
        verify: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        found = find_images(self.root)
        self.files = [path for path in found if _verifies(path)] if verify else found
        self.unreadable_at_start = len(found) - len(self.files)
        if not self.files:
            raise FileNotFoundError(f"no readable {'/'.join(IMAGE_EXTENSIONS)} images under {self.root}")
        self.size = size
        self.random_crop = random_crop
        self.hflip = hflip
        self.default_caption = default_caption
        self.captions, self.missing_captions = self._load_captions(captions)
        self._failed = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()
        logger.info(
            "%s: %d images, %d unreadable skipped, %d without a caption",
            self.root, len(self.files), self.unreadable_at_start, self.missing_captions,
        )  # fmt: skip

    def _load_captions(self, source: str | PathLike[str] | None) -> tuple[list[str], int]:
        if source is None:
            return [self.default_caption] * len(self.files), 0
        if source == "sidecar":
            found = [self._read_sidecar(path) for path in self.files]
        else:
            table = read_caption_file(Path(source))
            found = []
            for path in self.files:
                relative = path.relative_to(self.root).as_posix()
                found.append(table.get(relative, table.get(path.name)))
        missing = sum(caption is None for caption in found)
        return [self.default_caption if caption is None else caption for caption in found], missing

    @staticmethod
    def _read_sidecar(image_path: Path) -> str | None:
        text_path = image_path.with_suffix(".txt")
        if not text_path.is_file():
            return None
        try:
            return text_path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            logger.warning("caption %s is not UTF-8 (%s at byte %d): the image gets the default caption", text_path, err.reason, err.start)
            return None

    @property
    def skipped(self) -> int:
        """Unreadable images so far: dropped at construction plus failed to decode since (in any worker)."""
        return self.unreadable_at_start + int(self._failed.sum())

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as file:
            file.draft("RGB", (self.size, self.size))
            image = to_rgb(file)
            image.load()
        image = resize_and_crop(image, self.size, random_crop=self.random_crop)
        if self.hflip and bool(torch.rand(()) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return uint8_to_model_range(np.asarray(image))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        count = len(self.files)
        for step in range(count):
            candidate = (index + step) % count
            if self._failed[candidate]:
                continue
            try:
                image = self._load(candidate)
            except DECODE_ERRORS as error:
                self._failed[candidate] = True
                logger.warning("skipping unreadable image %s: %s", self.files[candidate], error)
                continue
            return {"image": image, "caption": self.captions[candidate]}
        raise RuntimeError(f"none of the {count} images under {self.root} can be decoded")
