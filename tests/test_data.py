"""Datasets: the procedural shapes (determinism, captions, held-out pairs, resolutions) and image
folders (pixels round-trip, captions, bad files skipped and counted, full batches)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import DEFAULT_HOLDOUT, ImageFolderDataset, ShapesDataset, build_dataloader, caption_from_attributes
from ldm.data.shapes import SHAPE_COLOURS, SHAPES
from ldm.evaluation.shapes_detector import score


def test_caption_wording() -> None:
    attributes = {"colour": "red", "shape": "circle", "size": "small", "position": "top left", "background": "blue"}
    assert caption_from_attributes(attributes) == "a small red circle in the top left on a blue background"


def test_same_seed_and_index_give_identical_bytes() -> None:
    cached = ShapesDataset(size=64, length=64, seed=3)
    rendered_on_demand = ShapesDataset(size=64, length=64, seed=3, cache=False)
    for index in (0, 17, 63):
        assert cached.image_uint8(index).tobytes() == rendered_on_demand.image_uint8(index).tobytes()
        assert torch.equal(cached[index]["image"], rendered_on_demand[index]["image"])
        assert cached[index]["caption"] == rendered_on_demand[index]["caption"]


def test_split_and_seed_change_the_images() -> None:
    train = ShapesDataset(size=32, length=50, split="train")
    val = ShapesDataset(size=32, length=50, split="val")
    other_seed = ShapesDataset(size=32, length=50, split="train", seed=1)
    for other in (val, other_seed):
        differing = sum(train.image_uint8(i).tobytes() != other.image_uint8(i).tobytes() for i in range(50))
        assert differing >= 45


def test_samples_are_model_ready() -> None:
    sample = ShapesDataset(size=64, length=4)[2]
    image = sample["image"]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image.min() < -0.5 or image.max() > 0.5
    with pytest.raises(IndexError):
        ShapesDataset(size=64, length=4)[4]


def test_captions_match_attributes_and_the_detector() -> None:
    dataset = ShapesDataset(size=64, length=200, seed=5)
    attributes = [dataset.attributes(i) for i in range(len(dataset))]
    for index, expected in enumerate(attributes):
        assert dataset[index]["caption"] == caption_from_attributes(expected)
        assert expected["colour"] != expected["background"]
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    accuracy = score(images, attributes)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_held_out_pairs_never_reach_train_or_val() -> None:
    held_out = set(DEFAULT_HOLDOUT)
    for split in ("train", "val"):
        dataset = ShapesDataset(size=32, length=5000, split=split, cache=False)
        pairs = {(a["colour"], a["shape"]) for a in map(dataset.attributes, range(len(dataset)))}
        assert not pairs & held_out
        assert pairs == {(c, s) for c in SHAPE_COLOURS for s in SHAPES} - held_out
    holdout = ShapesDataset(size=32, length=300, split="holdout", cache=False)
    assert {(a["colour"], a["shape"]) for a in map(holdout.attributes, range(300))} == held_out
    with pytest.raises(ValueError):
        ShapesDataset(size=32, length=10, split="holdout", holdout=None)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_any_resolution_draws_the_same_scene(size: int) -> None:
    dataset = ShapesDataset(size=size, length=40, seed=2)
    reference = ShapesDataset(size=256, length=40, seed=2, cache=False)
    assert dataset[0]["image"].shape == (3, size, size)
    for index in range(0, 40, 4):
        assert dataset.attributes(index) == reference.attributes(index)
        downsampled = Image.fromarray(reference.image_uint8(index)).resize((size, size), Image.Resampling.BOX)
        difference = np.abs(np.asarray(downsampled, dtype=np.int16) - dataset.image_uint8(index).astype(np.int16))
        assert difference.mean() < 1.5


def test_dataloader_batches_and_seeded_order() -> None:
    dataset = ShapesDataset(size=32, length=40)
    batch = next(iter(build_dataloader(dataset, batch_size=8, shuffle=False)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["caption"] == [dataset.caption(i) for i in range(8)]

    def order(seed: int) -> list[str]:
        loader = build_dataloader(dataset, batch_size=40, shuffle=True, seed=seed)
        return next(iter(loader))["caption"]

    assert order(0) == order(0)
    assert order(0) != order(1)


# Image folders


def write_image(path: Path, pixels: np.ndarray, **save_options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save_options)
    return path


def solid(height: int, width: int, colour: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, len(colour))).copy()


def to_model_range(colour: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32)[:, None, None] / 127.5 - 1.0


def test_folder_pixels_and_sidecar_captions_round_trip(tmp_path: Path) -> None:
    write_image(tmp_path / "a_red.png", solid(40, 70, (200, 30, 60)))
    (tmp_path / "a_red.txt").write_text("a red thing\n")
    write_image(tmp_path / "nested" / "deeper" / "b_green.jpg", solid(90, 48, (30, 180, 90)), quality=95)
    (tmp_path / "nested" / "deeper" / "b_green.txt").write_text("a green thing")
    transparent = solid(32, 32, (10, 20, 30, 0))
    transparent[8:24, 8:24] = (0, 0, 255, 255)
    write_image(tmp_path / "c_alpha.png", transparent)

    dataset = ImageFolderDataset(tmp_path, size=16, default_caption="something")
    assert len(dataset) == 3 and dataset.skipped == 0 and dataset.missing_captions == 1
    red, alpha, green = (dataset[i] for i in range(3))
    assert [path.name for path in dataset.files] == ["a_red.png", "c_alpha.png", "b_green.jpg"]
    assert red["caption"] == "a red thing" and green["caption"] == "a green thing"
    assert alpha["caption"] == "something"
    assert red["image"].shape == (3, 16, 16)
    torch.testing.assert_close(red["image"], to_model_range((200, 30, 60)).expand(3, 16, 16), atol=1 / 127.5, rtol=0)
    torch.testing.assert_close(green["image"], to_model_range((30, 180, 90)).expand(3, 16, 16), atol=4 / 127.5, rtol=0)
    torch.testing.assert_close(alpha["image"][:, 0, 0], to_model_range((255, 255, 255))[:, 0, 0])
    torch.testing.assert_close(alpha["image"][:, 8, 8], to_model_range((0, 0, 255))[:, 0, 0])


def test_centre_crop_keeps_the_middle(tmp_path: Path) -> None:
    pixels = solid(20, 60, (0, 0, 0))
    pixels[:, 20:40] = (255, 255, 255)
    write_image(tmp_path / "stripes.png", pixels)
    image = ImageFolderDataset(tmp_path, size=20, captions=None)[0]["image"]
    assert torch.all(image[:, :, 2:-2] == 1.0)


def test_random_crop_and_flip_vary(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (16, 1, 3))
    write_image(tmp_path / "ramp.png", ramp)
    dataset = ImageFolderDataset(tmp_path, size=16, captions=None, random_crop=True, hflip=True)
    torch.manual_seed(0)
    rows = [dataset[0]["image"][0, 0] for _ in range(40)]
    increasing = sum(bool(row[-1] > row[0]) for row in rows)
    assert 5 < increasing < 35
    assert len({round(float(row.mean()), 3) for row in rows}) > 10


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_caption_files(tmp_path: Path, kind: str) -> None:
    images = tmp_path / "images"
    write_image(images / "one.png", solid(8, 8, (1, 2, 3)))
    write_image(images / "sub" / "two.png", solid(8, 8, (4, 5, 6)))
    write_image(images / "three.png", solid(8, 8, (7, 8, 9)))
    captions = {"one.png": "first, with a comma", "sub/two.png": "second"}
    table = tmp_path / f"captions.{kind}"
    if kind == "jsonl":
        table.write_text("".join(json.dumps({"file_name": k, "text": v}) + "\n" for k, v in captions.items()))
    else:
        separator = "\t" if kind == "tsv" else ","
        quoted = {k: f'"{v}"' if separator in v else v for k, v in captions.items()}
        table.write_text(f"filename{separator}caption\n" + "".join(f"{k}{separator}{v}\n" for k, v in quoted.items()))
    dataset = ImageFolderDataset(images, size=8, captions=table, default_caption="?")
    by_name = {path.relative_to(images).as_posix(): caption for path, caption in zip(dataset.files, dataset.captions)}
    assert by_name == {"one.png": "first, with a comma", "sub/two.png": "second", "three.png": "?"}
    assert dataset.missing_captions == 1


def write_bad_files(root: Path) -> tuple[Path, Path]:
    """A truncated JPEG (passes the up-front check, fails to decode) and text named .png (fails the check)."""
    full = root / "full.jpg"
    write_image(full, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), quality=90)
    truncated = root / "b_truncated.jpg"
    truncated.write_bytes(full.read_bytes()[:1500])
    full.unlink()
    not_an_image = root / "c_not_an_image.png"
    not_an_image.write_text("this is not a picture")
    return truncated, not_an_image


def test_bad_files_are_skipped_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for index in range(5):
        write_image(tmp_path / f"good_{index}.png", solid(12, 12, (50 * index, 0, 0)))
    truncated, not_an_image = write_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ldm.data.folder"):
        dataset = ImageFolderDataset(tmp_path, size=8)
        assert len(dataset) == 6 and dataset.skipped == 1
        assert truncated in dataset.files and not_an_image not in dataset.files
        for _ in range(2):
            batches = list(build_dataloader(dataset, batch_size=3, shuffle=False))
            assert [len(batch["caption"]) for batch in batches] == [3, 3]
    assert dataset.skipped == 2
    assert sum(str(truncated) in record.getMessage() for record in caplog.records) == 1
    assert sum(str(not_an_image) in record.getMessage() for record in caplog.records) == 1


def test_decode_failures_in_workers_are_counted_in_the_main_process(tmp_path: Path) -> None:
    for index in range(7):
        write_image(tmp_path / f"good_{index}.png", solid(12, 12, (0, 30 * index, 0)))
    write_bad_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, size=8)
    loader = build_dataloader(dataset, batch_size=4, shuffle=True, num_workers=2, drop_last=False)
    sizes = [len(batch["caption"]) for batch in loader]
    assert sizes == [4, 4]
    assert dataset.skipped == 2


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing to see")
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path, size=8)
