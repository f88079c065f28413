"""A procedural detector for ShapesDataset-style images: reads back colour, shape, size, position and
background, so that "does a generated 'red circle' contain a red circle?" becomes a number.

No learning, and deliberately tolerant of what an autoencoder or a diffusion model does to an image
(blur, noise, colour shifts): nothing depends on exact pixel values or a fixed threshold.

- background: the median of the border pixels, named by the nearest background colour;
- foreground: each pixel's colour distance from that background, against the 99.5th percentile of all
  distances (so a faint or colour-shifted shape is still found); the mask is where it exceeds half;
- colour: the median of the pixels above three quarters of it, named by the nearest shape colour;
- the soft coverage (distance / the shape's contrast, in [0, 1]) around the mask; its box is where the
  coverage crosses 1/2, to sub-pixel precision (whole pixels are too coarse for a shape 7 pixels wide);
- shape: the coverage is fitted by a circle, a square and an upward triangle drawn at 4x supersampling
  around the box (a few sub-pixel shifts and sizes), each also blurred by Gaussians of a few widths,
  with a free amplitude; the best least-squares fit names the shape. Blur is part of the model, so a
  soft 7-pixel square is not taken for a circle (the corner mass a blur removes from a square is
  what tells them apart, and a blurred circle template cannot put it back);
- size: the longer side of the box against the image side; position: the box centre on the 3x3 grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ldm.data.shapes import BACKGROUNDS, COLOURS, HALF_EXTENT, SHAPE_COLOURS, SHAPES, grid_cell

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background")
NOT_FOUND = "none"

MIN_CONTRAST = 24.0
"""99.5th-percentile distance (0-255 RGB units) below which the image is taken to hold no shape."""
MASK_LEVEL = 0.5
CORE_LEVEL = 0.75
NOISE_LEVEL = 0.15
MARGIN = 2
TEMPLATE_SUPERSAMPLE = 4
TEMPLATE_SHIFTS = (-0.5, -0.25, 0.0, 0.25, 0.5)
"""Sub-pixel shifts (pixels) of the templates' centre around the measured box centre, in x and in y."""
TEMPLATE_SCALES = (0.85, 0.95, 1.05, 1.15)
"""Template half-sides as multiples of the measured half box side."""
TEMPLATE_BLURS = (0.0, 0.5, 0.8, 1.1)
"""Gaussian blur widths (pixels) the templates are also compared at."""
LARGE_MIN_EXTENT = HALF_EXTENT["small"] + HALF_EXTENT["large"]
"""Bounding-box side (fraction of the image side) halfway between a small and a large shape."""
MAX_EXTENT = 0.45
"""Beyond this bounding-box side the foreground is no single shape of the vocabulary (e.g. texture or
noise from an untrained model): only its colour is reported."""

_BACKGROUND_RGB = np.array([COLOURS[name] for name in BACKGROUNDS], dtype=np.float32)
_SHAPE_RGB = np.array([COLOURS[name] for name in SHAPE_COLOURS], dtype=np.float32)


def to_uint8_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An ``H x W x 3`` uint8 array, or a ``3 x H x W`` tensor in [-1, 1] -> ``H x W x 3`` uint8 array.

    Converted with numpy: torch's ops on small tensors stall when the cores are oversubscribed.
    """
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3 x H x W tensor in [-1, 1], got shape {tuple(image.shape)}")
        values = image.detach().to("cpu", torch.float32).numpy()
        return np.rint((np.clip(values, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 array, got {array.dtype} {array.shape}")
    return array


def _nearest(rgb: np.ndarray, palette: np.ndarray, names: Sequence[str]) -> str:
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


def _drop_isolated(mask: np.ndarray) -> np.ndarray:
    """Remove mask pixels none of whose 4-neighbours is in the mask (speckle from noise)."""
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask & neighbours


def _half_level_span(coverage: np.ndarray) -> tuple[float, float]:
    """Sub-pixel leftmost and rightmost points, over all rows, where ``coverage`` crosses 1/2.

    Pixel ``j`` spans ``[j, j + 1)`` and its value sits at ``j + 0.5``; crossings are linearly
    interpolated between neighbouring pixel centres, so the span of a shape a few pixels wide is not
    rounded to whole pixels.
    """
    padded = np.pad(coverage, ((0, 0), (1, 1)))
    above = padded >= 0.5
    rows = np.nonzero(above.any(axis=1))[0]
    first = above[rows].argmax(axis=1)
    last = above.shape[1] - 1 - above[rows, ::-1].argmax(axis=1)
    inner, outer = padded[rows, first], padded[rows, first - 1]
    lefts = first - 1.5 + (0.5 - outer) / (inner - outer)
    inner, outer = padded[rows, last], padded[rows, last + 1]
    rights = last - 0.5 + (inner - 0.5) / (inner - outer)
    return float(lefts.min()), float(rights.max())


def _template_coverage(shape: str, xs: np.ndarray, ys: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Inside-ness of supersample points ``xs``/``ys`` (offsets from the centre, ``... x P x Q``) for
    shapes of half-side ``half`` (broadcast against them)."""
    if shape == "circle":
        return (xs**2 + ys**2 <= half**2).astype(np.float32)
    if shape == "square":
        return ((np.abs(xs) <= half) & (np.abs(ys) <= half)).astype(np.float32)
    return ((ys <= half) & (np.abs(xs) <= (ys + half) / 2.0)).astype(np.float32)


def _gaussian_kernels(size: int, sigmas: Sequence[float]) -> np.ndarray:
    """``len(sigmas) x size x size`` matrices that blur a ``size``-long axis."""
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    kernels = []
    for sigma in sigmas:
        if sigma == 0.0:
            kernels.append(np.eye(size, dtype=np.float32))
            continue
        weights = np.exp(-(offsets**2) / (2.0 * sigma**2)).astype(np.float32)
        kernels.append(weights / weights.sum(axis=0, keepdims=True))
    return np.stack(kernels)


def _fit_shape(coverage: np.ndarray, centre_x: float, centre_y: float, half: float) -> str:
    """The shape whose (shifted, scaled, blurred) template fits ``coverage`` best in least squares.

    ``coverage``: the soft coverage of a window; ``centre_*``, ``half``: the measured box, in that
    window's pixel coordinates (pixel ``j`` spans ``[j, j + 1)``).
    """
    s = TEMPLATE_SUPERSAMPLE
    rows, cols = coverage.shape
    sub = (np.arange(s) + 0.5) / s
    px = (np.arange(cols)[:, None] + sub[None, :]).reshape(-1)
    py = (np.arange(rows)[:, None] + sub[None, :]).reshape(-1)
    shifts = np.asarray(TEMPLATE_SHIFTS, dtype=np.float32)
    halves = half * np.asarray(TEMPLATE_SCALES, dtype=np.float32)
    # candidates: shift_x x shift_y x scale, each a rows*s x cols*s grid of offsets from its centre
    xs = px[None, None, None, None, :] - (centre_x + shifts)[:, None, None, None, None]
    ys = py[None, None, None, :, None] - (centre_y + shifts)[None, :, None, None, None]
    hs = halves[None, None, :, None, None]
    row_blur = _gaussian_kernels(rows, TEMPLATE_BLURS)
    col_blur = _gaussian_kernels(cols, TEMPLATE_BLURS)
    target = coverage.astype(np.float32)
    best_shape, best_error = SHAPES[0], np.inf
    for shape in SHAPES:
        inside = _template_coverage(shape, xs, ys, hs)
        pixels = inside.reshape(*inside.shape[:3], rows, s, cols, s).mean(axis=(4, 6))
        # blur every candidate at every width: B x ... x rows x cols
        blurred = np.einsum("bij,xyzjk,bkl->bxyzil", row_blur, pixels, col_blur.transpose(0, 2, 1), optimize=True)
        dot = np.einsum("...ij,ij->...", blurred, target)
        norm = np.einsum("...ij,...ij->...", blurred, blurred)
        error = float(np.min(np.sum(target**2) - dot**2 / np.maximum(norm, 1e-6)))
        if error < best_error:
            best_shape, best_error = shape, error
    return best_shape


def measure(image: np.ndarray | torch.Tensor) -> dict[str, float | str | None]:
    """The raw cues ``detect`` decides from (useful to calibrate or debug it)."""
    rgb = to_uint8_image(image).astype(np.float32)
    height, width = rgb.shape[:2]
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - background_rgb, axis=-1)
    peak = float(np.percentile(distance, 99.5))
    cues: dict[str, float | str | None] = {
        "background": _nearest(background_rgb, _BACKGROUND_RGB, BACKGROUNDS),
        "peak": peak,
        "colour": None,
    }
    if peak < MIN_CONTRAST:
        return cues
    mask = _drop_isolated(distance > MASK_LEVEL * peak)
    if not mask.any():
        return cues
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    core = distance > CORE_LEVEL * peak
    contrast = min(float(np.median(distance[core])), peak)
    window_top, window_left = max(top - MARGIN, 0), max(left - MARGIN, 0)
    coverage = np.clip(distance[window_top : bottom + MARGIN, window_left : right + MARGIN] / contrast, 0.0, 1.0)
    coverage_raw = coverage.copy()
    coverage[coverage < NOISE_LEVEL] = 0.0
    x0, x1 = _half_level_span(coverage)
    y0, y1 = _half_level_span(coverage.T)
    extent = max(x1 - x0, y1 - y0) / max(height, width)
    cues.update(
        colour=_nearest(np.median(rgb[core], axis=0), _SHAPE_RGB, SHAPE_COLOURS),
        # too big to be one shape: no fit (it would only be discarded, and costs most on the largest windows)
        shape=_fit_shape(coverage_raw, (x0 + x1) / 2.0, (y0 + y1) / 2.0, max(x1 - x0, y1 - y0) / 2.0) if extent <= MAX_EXTENT else None,
        extent=extent,
        centre_x=(window_left + (x0 + x1) / 2.0) / width,
        centre_y=(window_top + (y0 + y1) / 2.0) / height,
    )
    return cues


def detect(image: np.ndarray | torch.Tensor) -> dict[str, str]:
    """Read ``colour``, ``shape``, ``size``, ``position`` and ``background`` off one image.

    ``image``: ``H x W x 3`` uint8 array or ``3 x H x W`` tensor in [-1, 1]. When nothing stands out
    from the background, every attribute but ``background`` is ``"none"``; when the foreground is
    too big to be one shape, so are all but ``colour`` and ``background``.
    """
    cues = measure(image)
    if cues["colour"] is None:
        return {name: NOT_FOUND for name in ATTRIBUTES} | {"background": cues["background"]}
    if cues["extent"] > MAX_EXTENT:
        return {name: NOT_FOUND for name in ATTRIBUTES} | {"colour": cues["colour"], "background": cues["background"]}
    return {
        "colour": cues["colour"],
        "shape": cues["shape"],
        "size": "large" if cues["extent"] >= LARGE_MIN_EXTENT else "small",
        "position": grid_cell(cues["centre_x"], cues["centre_y"]),
        "background": cues["background"],
    }


def detect_batch(images: torch.Tensor | Sequence[np.ndarray | torch.Tensor]) -> list[dict[str, str]]:
    """``detect`` over a ``B x 3 x H x W`` tensor in [-1, 1] or a sequence of single images."""
    return [detect(image) for image in images]


def score(
    images: torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    attributes_list: Sequence[Mapping[str, str]],
) -> dict[str, float]:
    """Accuracy of each attribute the expected dicts name, and ``all`` (every named attribute right).

    ``images``: a ``B x 3 x H x W`` tensor in [-1, 1] (a decoded batch) or a sequence of single
    images; ``attributes_list``: the intended attributes of each, e.g. ``ShapesDataset.attributes(i)``.
    """
    if len(images) != len(attributes_list):
        raise ValueError(f"{len(images)} images but {len(attributes_list)} attribute dicts")
    if len(attributes_list) == 0:
        raise ValueError("score needs at least one image")
    names = [name for name in ATTRIBUTES if all(name in expected for expected in attributes_list)]
    correct = dict.fromkeys(names, 0)
    all_correct = 0
    for found, expected in zip(detect_batch(images), attributes_list):
        hits = {name: found[name] == expected[name] for name in names}
        for name, hit in hits.items():
            correct[name] += hit
        all_correct += all(hits.values())
    count = len(attributes_list)
    return {name: hits / count for name, hits in correct.items()} | {"all": all_correct / count}
