"""The procedural shapes detector reads attributes back from clean, degraded and hand-drawn images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.data.shapes import BACKGROUNDS, COLOURS, SHAPE_COLOURS, SHAPES, ShapesDataset, render
from ldm.evaluation.shapes_detector import NOT_FOUND, detect, detect_batch, score


def shapes_batch(count: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """``count`` shapes as a ``B x 3 x H x W`` tensor in [-1, 1], with their attributes; every
    (colour, shape) pair can occur."""
    dataset = ShapesDataset(size=size, length=count, seed=seed, holdout=None, cache=False)
    images = torch.stack([dataset[i]["image"] for i in range(count)])
    return images, [dataset.attributes(i) for i in range(count)]


def gaussian_blur(images: torch.Tensor, kernel_size: int = 3, sigma: float = 0.8) -> torch.Tensor:
    offsets = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    kernel = (weights[:, None] * weights[None, :]).expand(images.shape[1], 1, kernel_size, kernel_size)
    padded = F.pad(images, (kernel_size // 2,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=images.shape[1])


def autoencoder_like(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """What a small autoencoder does to an image: soft edges, pixel noise, a per-image colour cast."""
    generator = torch.Generator().manual_seed(seed)
    noise = 0.03 * torch.randn(images.shape, generator=generator)
    cast = 0.06 * (2 * torch.rand(images.shape[0], 3, 1, 1, generator=generator) - 1)
    return (gaussian_blur(images) + noise + cast).clamp(-1, 1)


def test_clean_renders_are_read_back() -> None:
    images, attributes = shapes_batch(300)
    accuracy = score(images, attributes)
    for name in ("colour", "shape", "background"):
        assert accuracy[name] >= 0.98, accuracy
    assert accuracy["size"] >= 0.98 and accuracy["position"] >= 0.98, accuracy


def test_autoencoder_like_degradation_is_tolerated() -> None:
    images, attributes = shapes_batch(300, seed=1)
    degraded = autoencoder_like(images)
    assert (degraded - images).abs().mean() > 0.02
    accuracy = score(degraded, attributes)
    for name in ("colour", "shape", "background", "size", "position"):
        assert accuracy[name] >= 0.95, accuracy


def test_shapes_drawn_without_the_renderer() -> None:
    """Hand-drawn at 96 px with numpy (no antialiasing, off-palette colours): an independent check."""
    side = 96
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    cases = [
        ((xs - 16) ** 2 + (ys - 16) ** 2 <= 13**2, (200, 40, 45), (20, 20, 20),
         {"colour": "red", "shape": "circle", "size": "large", "position": "top left", "background": "black"}),
        ((abs(xs - 48) <= 6) & (abs(ys - 80) <= 6), (60, 200, 215), (120, 125, 130),
         {"colour": "cyan", "shape": "square", "size": "small", "position": "bottom center", "background": "gray"}),
        ((ys >= 66) & (ys <= 92) & (abs(xs - 80) <= (ys - 66) / 2), (250, 230, 60), (35, 60, 210),
         {"colour": "yellow", "shape": "triangle", "size": "large", "position": "bottom right", "background": "blue"}),
        ((abs(xs - 80) <= 14) & (abs(ys - 48) <= 14), (235, 130, 30), (250, 250, 250),
         {"colour": "orange", "shape": "square", "size": "large", "position": "center right", "background": "white"}),
    ]  # fmt: skip
    for inside, fill, background, expected in cases:
        image = np.empty((side, side, 3), dtype=np.uint8)
        image[:] = background
        image[inside] = fill
        assert detect(image) == expected


@pytest.mark.parametrize("shape", SHAPES)
def test_every_colour_on_every_background(shape: str) -> None:
    for colour in SHAPE_COLOURS:
        for background in BACKGROUNDS:
            if background == colour:
                continue
            attributes = {
                "colour": colour, "shape": shape, "size": "small", "position": "center", "background": background,
            }  # fmt: skip
            assert detect(render(attributes, 64)) == attributes


def test_tensor_and_uint8_inputs_agree() -> None:
    images, _ = shapes_batch(8)
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert detect_batch(images) == detect_batch(list(as_uint8))


def test_plain_image_has_no_shape() -> None:
    image = np.full((64, 64, 3), COLOURS["gray"], dtype=np.uint8)
    image += np.random.default_rng(0).integers(0, 4, size=image.shape, dtype=np.uint8)
    assert detect(image) == {
        "colour": NOT_FOUND, "shape": NOT_FOUND, "size": NOT_FOUND, "position": NOT_FOUND, "background": "gray",
    }  # fmt: skip


def test_noise_is_not_a_shape() -> None:
    """An untrained model's output: texture everywhere is no shape, and must not score as one."""
    image = np.full((64, 64, 3), COLOURS["black"], dtype=np.uint8)
    image[4:60, 4:60] = np.random.default_rng(0).integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    found = detect(image)
    assert found["background"] == "black"
    assert found["shape"] == found["size"] == found["position"] == NOT_FOUND


def test_score_counts_each_attribute_separately() -> None:
    images, attributes = shapes_batch(20)
    wrong = [dict(a) for a in attributes]
    for a in wrong[:5]:
        a["colour"] = next(c for c in SHAPE_COLOURS if c not in (a["colour"], a["background"]))
    for a in wrong[5:15]:
        a["shape"] = next(s for s in SHAPES if s != a["shape"])
    accuracy = score(images, wrong)
    assert accuracy["colour"] == pytest.approx(15 / 20)
    assert accuracy["shape"] == pytest.approx(10 / 20)
    assert accuracy["background"] == 1.0
    assert accuracy["all"] == pytest.approx(5 / 20)
    only_colour = score(images, [{"colour": a["colour"]} for a in attributes])
    assert only_colour == {"colour": 1.0, "all": 1.0}
    with pytest.raises(ValueError):
        score(images, attributes[:-1])
