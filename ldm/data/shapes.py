"""The embedded default dataset: procedurally drawn, captioned shapes.

Every image is a pure function of ``(seed, split, index)``: one coloured shape of a given size at one of
nine grid positions on a plain background, captioned in words ("a small red circle in the top left on a
gray background"). Because the attributes are known, whether a model learned them can be measured with
``ldm.evaluation.shapes_detector``.

Some (colour, shape) combinations are held out of the "train" and "val" splits; the "holdout" split
draws only from them, to test whether a model composes words it saw separately.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.data.transforms import uint8_to_model_range

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 50),
    "cyan": (40, 210, 220),
    "blue": (40, 70, 220),
    "magenta": (220, 50, 210),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPE_COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "magenta", "white")
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "white", "blue")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "center left", "center", "center right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "val", "holdout")
CLASSES: tuple[tuple[str, str], ...] = tuple((colour, shape) for colour in SHAPE_COLOURS for shape in SHAPES)
"""The (colour, shape) pairs; ``sample["label"]`` is an index into it (24 classes, held-out pairs included)."""
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))

HALF_EXTENT: dict[str, float] = {"small": 0.11, "large": 0.16}
"""Half the width (and height) of a shape's bounding box, as a fraction of the image side."""

_CELL_HALF = 1.0 / 6.0
_JITTER_FRACTION = 0.8
_SUPERSAMPLE = 4


def caption_from_attributes(attributes: Mapping[str, str]) -> str:
    """``{"size": "small", "colour": "red", ...}`` -> "a small red circle in the top left on a blue background"."""
    a = attributes
    return f"a {a['size']} {a['colour']} {a['shape']} in the {a['position']} on a {a['background']} background"


def position_centre(position: str) -> tuple[float, float]:
    """Centre ``(x, y)`` of a grid position, as fractions of the image side."""
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) / 3.0, (row + 0.5) / 3.0


def grid_cell(x: float, y: float) -> str:
    """Name of the 3x3 grid position containing the point ``(x, y)`` given as fractions of the side."""
    col = min(max(math.floor(x * 3.0), 0), 2)
    row = min(max(math.floor(y * 3.0), 0), 2)
    return POSITIONS[row * 3 + col]


def render(attributes: Mapping[str, str], size: int, jitter: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Draw one shape as a ``size x size x 3`` uint8 array.

    ``jitter`` in [-1, 1]^2 moves the shape inside its grid cell without leaving it. Edges are
    antialiased: the shape's coverage is drawn at 4x over its own bounding box only, box-averaged,
    and used as the alpha with which the shape colour is pasted over the background.
    """
    half = HALF_EXTENT[attributes["size"]]
    max_shift = (_CELL_HALF - half) * _JITTER_FRACTION
    centre_x, centre_y = position_centre(attributes["position"])
    cx = (centre_x + jitter[0] * max_shift) * size
    cy = (centre_y + jitter[1] * max_shift) * size
    h = half * size
    left, top = max(math.floor(cx - h), 0), max(math.floor(cy - h), 0)
    right, bottom = min(math.ceil(cx + h), size), min(math.ceil(cy + h), size)

    s = _SUPERSAMPLE
    coverage = Image.new("L", ((right - left) * s, (bottom - top) * s), 0)
    x0, y0, x1, y1 = ((cx - h - left) * s, (cy - h - top) * s, (cx + h - left) * s, (cy + h - top) * s)
    draw = ImageDraw.Draw(coverage)
    shape = attributes["shape"]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    image = Image.new("RGB", (size, size), COLOURS[attributes["background"]])
    image.paste(COLOURS[attributes["colour"]], (left, top, right, bottom), mask=coverage.reduce(s))
    return np.array(image)


class ShapesDataset(Dataset):
    """Captioned shapes; sample ``i`` is ``{"image": 3 x size x size float in [-1, 1], "caption": str, "label": int}``,
    the label being the index of its (colour, shape) in ``CLASSES``.

    The splits draw their attributes from independent random streams (split name is part of the
    seed), and "train"/"val" never contain a held-out (colour, shape) pair. With ``cache=True`` every
    image is rendered once at construction into one uint8 tensor (3 bytes per pixel), which DataLoader
    workers share rather than copy.
    """

    def __init__(
        self,
        size: int = 64,
        length: int = 20000,
        split: str = "train",
        seed: int = 0,
        holdout: Sequence[Sequence[str]] | None = DEFAULT_HOLDOUT,
        cache: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {size}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        held_out = {tuple(pair) for pair in (holdout or ())}
        for colour, shape in held_out:
            if colour not in SHAPE_COLOURS or shape not in SHAPES:
                raise ValueError(f"held-out pair {(colour, shape)!r} is not a (colour, shape) of the vocabulary")
        every_pair = [(colour, shape) for colour in SHAPE_COLOURS for shape in SHAPES]
        if split == "holdout":
            self.pairs = [pair for pair in every_pair if pair in held_out]
            if not self.pairs:
                raise ValueError('split "holdout" needs at least one held-out (colour, shape) pair')
        else:
            self.pairs = [pair for pair in every_pair if pair not in held_out]
        self.size = size
        self.length = length
        self.split = split
        self.seed = seed
        self.holdout = tuple(sorted(held_out))
        self._cache: torch.Tensor | None = None
        self._captions: list[str] | None = None
        self._labels: list[int] | None = None
        if cache:
            self._render_all()

    def __len__(self) -> int:
        return self.length

    def _check(self, index: int) -> None:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")

    def _draw(self, index: int) -> tuple[dict[str, str], tuple[float, float]]:
        self._check(index)
        u = np.random.default_rng([self.seed, SPLITS.index(self.split), index]).random(6)
        colour, shape = self.pairs[int(u[0] * len(self.pairs))]
        backgrounds = [name for name in BACKGROUNDS if name != colour]
        attributes = {
            "colour": colour,
            "shape": shape,
            "size": SIZES[int(u[1] * len(SIZES))],
            "position": POSITIONS[int(u[2] * len(POSITIONS))],
            "background": backgrounds[int(u[3] * len(backgrounds))],
        }
        return attributes, (float(2.0 * u[4] - 1.0), float(2.0 * u[5] - 1.0))

    def attributes(self, index: int) -> dict[str, str]:
        """The ``colour``, ``shape``, ``size``, ``position`` and ``background`` of sample ``index``."""
        return self._draw(index)[0]

    def caption(self, index: int) -> str:
        if self._captions is not None:
            self._check(index)
            return self._captions[index]
        return caption_from_attributes(self.attributes(index))

    def image_uint8(self, index: int) -> np.ndarray:
        """Sample ``index`` as a ``size x size x 3`` uint8 array."""
        if self._cache is not None:
            self._check(index)
            return self._cache[index].numpy()
        attributes, jitter = self._draw(index)
        return render(attributes, self.size, jitter)

    def label(self, index: int) -> int:
        """The index of sample ``index``'s (colour, shape) in ``CLASSES``."""
        if self._labels is not None:
            self._check(index)
            return self._labels[index]
        attributes = self.attributes(index)
        return CLASSES.index((attributes["colour"], attributes["shape"]))

    def _render_all(self) -> None:
        images = np.empty((self.length, self.size, self.size, 3), dtype=np.uint8)
        captions, labels = [], []
        for index in range(self.length):
            attributes, jitter = self._draw(index)
            images[index] = render(attributes, self.size, jitter)
            captions.append(caption_from_attributes(attributes))
            labels.append(CLASSES.index((attributes["colour"], attributes["shape"])))
        self._cache, self._captions, self._labels = torch.from_numpy(images), captions, labels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        return {"image": uint8_to_model_range(self.image_uint8(index)), "caption": self.caption(index), "label": self.label(index)}
