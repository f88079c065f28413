"""Streaming image-caption shards (ldm/data/shards.py, ldm/data/laion.py): pixels and captions round-trip,
bad data is skipped and counted (also from DataLoader workers), the metadata filters drop what they
should, epochs have a fixed length, DDP ranks get disjoint data and the same number of batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.laion import ImageTextDecoder, MetadataFilter
from ldm.data.shards import NoShardsError, ShardedDataset, expand_urls
from ldm.data.transforms import uint8_to_model_range
from ldm.training.datamodule import ShardDataModule
from shard_helpers import corrupt_jpeg, encode, good_sample, pixels, write_good_shards, write_shard


def _one_pass(urls, decoder: ImageTextDecoder, batch_size: int = 4, num_workers: int = 0) -> tuple[dict[str, dict], Counter]:
    """Every sample of one ordered pass, by key, and the summed counts its batches carried."""
    dataset = ShardedDataset(urls, decoder, batch_size, shard_shuffle=False, drop_last=False)
    samples: dict[str, dict] = {}
    counts: Counter = Counter()
    for batch in DataLoader(dataset, batch_size=None, num_workers=num_workers):
        counts.update(batch["data_counts"])
        for i, key in enumerate(batch["key"]):
            assert key not in samples
            samples[key] = {"image": batch["image"][i], "caption": batch["caption"][i], "metadata": batch["metadata"][i]}
    return samples, counts


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """Two shards of good and bad samples, and a third that is not a tar at all."""
    root = tmp_path_factory.mktemp("mixed")
    write_shard(root / "00000.tar", [
        good_sample("good0", 0),
        {"__key__": "jpeg_40x48", "jpg": encode(pixels(1, 40, 48), "JPEG"), "txt": "a jpeg", "json": {"width": 40, "height": 48}},
        {"__key__": "corrupt", "jpg": corrupt_jpeg(), "txt": "a corrupt jpeg", "json": {"width": 64, "height": 64}},
        {"__key__": "no_caption", "png": encode(pixels(2)), "json": {"width": 32, "height": 32}},
        {"__key__": "blank_caption", "png": encode(pixels(3)), "txt": "   ", "json": {"width": 32, "height": 32}},
        good_sample("good1", 4),
    ])
    write_shard(root / "00001.tar", [
        {"__key__": "small_by_json", "png": encode(pixels(5, 16, 16)), "txt": "small", "json": {"width": 16, "height": 16}},
        {"__key__": "small_no_json", "png": encode(pixels(6, 24, 40)), "txt": "small, no json"},
        {"__key__": "no_image", "txt": "a caption alone", "json": {}},
        {"__key__": "bad_json", "png": encode(pixels(7)), "txt": "x", "json": b"{not json"},
        good_sample("good2", 8),
    ])
    (root / "00002.tar").write_bytes(b"this is not a tar file" * 10)
    return root


GOOD = {"good0", "good1", "good2", "jpeg_40x48"}
SKIPPED = {"corrupt_image": 1, "no_caption": 2, "too_small": 2, "no_image": 1, "bad_metadata": 1, "shard_error": 1}


def test_pixels_and_captions_round_trip(mixed_shards: Path) -> None:
    decoder = ImageTextDecoder(32, random_crop=False)
    samples, _ = _one_pass(str(mixed_shards / "{00000..00002}.tar"), decoder)
    expected = uint8_to_model_range(pixels(0))  # a 32x32 PNG at size 32: no resize, no crop
    assert torch.equal(samples["good0"]["image"], expected)
    assert samples["good0"]["caption"] == "caption good0"
    assert samples["good0"]["metadata"] == {"width": 32, "height": 32}
    jpeg = samples["jpeg_40x48"]["image"]  # resized to 32 on its short side, centre-cropped
    assert jpeg.shape == (3, 32, 32) and jpeg.dtype == torch.float32 and -1 <= jpeg.min() and jpeg.max() <= 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(mixed_shards: Path, num_workers: int, caplog) -> None:
    """The counts reach the main process in the batches, whichever worker read the bad sample."""
    decoder = ImageTextDecoder(32, random_crop=False, filters=MetadataFilter(min_width=32, min_height=32))
    samples, counts = _one_pass(str(mixed_shards / "{00000..00002}.tar"), decoder, batch_size=2, num_workers=num_workers)
    assert set(samples) == GOOD
    assert {k: v for k, v in counts.items() if k != "samples"} == SKIPPED
    assert counts["samples"] == len(GOOD)
    if num_workers == 0:
        messages = caplog.text
        assert "skipping corrupt image: corrupt in" in messages and "00000.tar" in messages
        assert "skipping shard error:" in messages and "00002.tar" in messages


def test_random_crops_and_flips_are_windows_of_the_image(tmp_path: Path) -> None:
    """A 64x32 horizontal ramp at size 32: the centre crop is columns 16..47; a random crop is some
    32-column window, mirrored half of the time."""
    ramp = np.repeat(np.repeat((np.arange(64) * 4).astype(np.uint8)[None, :, None], 32, axis=0), 3, axis=2)
    png = encode(ramp)
    shard = write_shard(tmp_path / "ramp.tar", [{"__key__": f"r{i}", "png": png, "txt": "a ramp"} for i in range(24)])
    centre, _ = _one_pass(str(shard), ImageTextDecoder(32, random_crop=False))
    assert torch.equal(centre["r0"]["image"], uint8_to_model_range(ramp[:, 16:48]))
    offsets, flips = set(), 0
    random, _ = _one_pass(str(shard), ImageTextDecoder(32, random_crop=True, hflip=True))
    for sample in random.values():
        image = sample["image"]
        flipped = bool(image[0, 0, 0] > image[0, 0, -1])
        if flipped:
            image = image.flip(-1)
        offset = int(round((image[0, 0, 0].item() + 1) * 127.5 / 4))
        assert torch.equal(image, uint8_to_model_range(ramp[:, offset:offset + 32]))
        offsets.add(offset)
        flips += flipped
    assert len(offsets) > 3 and 0 < flips < len(random)


FILTERED = [
    # (filter, keys kept, count of the rest)
    (MetadataFilter(min_width=48), {"big", "no_scores"}, {"too_small": 2}),  # no_scores: its decoded size counts
    (MetadataFilter(min_height=48, height_key="original_height"), {"mid", "no_scores"}, {"too_small": 2}),
    (MetadataFilter(min_aesthetic=5.0), {"mid", "big"}, {"low_aesthetic": 1, "missing_metadata": 1}),
    (MetadataFilter(min_aesthetic=6.0, aesthetic_key="AESTHETIC_SCORE"), {"big"}, {"low_aesthetic": 2, "missing_metadata": 1}),
    (MetadataFilter(max_punsafe=0.3), {"small", "big"}, {"unsafe": 1, "missing_metadata": 1}),
    (MetadataFilter(max_pwatermark=0.5), {"small", "mid"}, {"watermark": 1, "missing_metadata": 1}),
    (MetadataFilter(min_caption_length=12), {"mid", "no_scores"}, {"short_caption": 2}),
]


@pytest.mark.parametrize(("filters", "kept", "dropped"), FILTERED)
def test_filters_drop_what_they_should(tmp_path: Path, filters: MetadataFilter, kept: set[str], dropped: dict[str, int]) -> None:
    def sample(key: str, side: int, caption: str, **scores) -> dict:
        return {"__key__": key, "png": encode(pixels(side, side, side)), "txt": caption, "json": {"width": side, "height": side, **scores}}

    shard = write_shard(tmp_path / "scored.tar", [
        sample("small", 32, "short", aesthetic=4.0, AESTHETIC_SCORE=4.0, punsafe=0.1, pwatermark=0.2, original_height=40),
        sample("mid", 40, "a longer caption", aesthetic=5.5, AESTHETIC_SCORE=5.5, punsafe=0.9, pwatermark=0.3, original_height=64),
        sample("big", 64, "medium text", aesthetic=6.5, AESTHETIC_SCORE=6.5, punsafe=0.0, pwatermark=0.9, original_height=32),
        {"__key__": "no_scores", "png": encode(pixels(9, 48, 48)), "txt": "no scores at all"},
    ])
    samples, counts = _one_pass(str(shard), ImageTextDecoder(32, random_crop=False, filters=filters))
    assert set(samples) == kept
    assert {k: v for k, v in counts.items() if k != "samples" and v} == {k: v for k, v in dropped.items() if v}


@pytest.mark.parametrize(("resampled", "num_workers"), [(True, 0), (True, 2), (False, 2)])
def test_an_epoch_has_exactly_batches_per_epoch_batches(tmp_path: Path, resampled: bool, num_workers: int) -> None:
    """Also when one pass over the data is shorter than an epoch (it starts over) or longer (it stops)."""
    write_good_shards(tmp_path, shards=4, per_shard=3)
    dataset = ShardedDataset(str(tmp_path), ImageTextDecoder(32), batch_size=2, batches_per_epoch=9, resampled=resampled,
                             shuffle_buffer=4)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)
    assert len(loader) == 9
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 9 and all(len(b["key"]) == 2 for b in batches)


def test_a_pass_with_nothing_that_comes_through_stops_the_run(tmp_path: Path) -> None:
    write_good_shards(tmp_path, shards=2, per_shard=2)
    dataset = ShardedDataset(str(tmp_path), ImageTextDecoder(32, filters=MetadataFilter(min_width=1000)), batch_size=2,
                             batches_per_epoch=3)
    with pytest.raises(RuntimeError, match=r"gave 0 of 3 batches; no sample came through .*too_small.*filters"):
        list(dataset)


def test_endless_unreadable_shards_stop_the_run(tmp_path: Path) -> None:
    (tmp_path / "bad.tar").write_bytes(b"garbage")
    dataset = ShardedDataset(str(tmp_path / "bad.tar"), ImageTextDecoder(32), batch_size=2, batches_per_epoch=1, resampled=True)
    with pytest.raises(RuntimeError, match=r"100 shards in a row could not be read .*check the shard URLs"):
        list(dataset)


def test_a_pattern_that_matches_nothing_says_how_to_make_shards(tmp_path: Path) -> None:
    with pytest.raises(NoShardsError, match=r"No shards match .*none exists.*python -m ldm.tools.make_shards"):
        expand_urls(str(tmp_path / "{00000..00009}.tar"))
    with pytest.raises(NoShardsError):
        expand_urls(str(tmp_path))  # a folder without .tar files


def test_patterns_globs_folders_and_gaps(tmp_path: Path, caplog) -> None:
    for name in ("00000.tar", "00001.tar", "00003.tar"):
        (tmp_path / name).write_bytes(b"")
    names = lambda urls: [os.path.basename(u) for u in urls]  # noqa: E731
    assert names(expand_urls(str(tmp_path / "{00000..00003}.tar"))) == ["00000.tar", "00001.tar", "00003.tar"]
    assert "1 of 4 shards do not exist" in caplog.text
    assert names(expand_urls(str(tmp_path / "*.tar"))) == ["00000.tar", "00001.tar", "00003.tar"]
    assert names(expand_urls(str(tmp_path))) == ["00000.tar", "00001.tar", "00003.tar"]
    assert expand_urls("pipe:cat /x/{0..2}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar", "pipe:cat /x/2.tar"]
    assert len(expand_urls(["s3://bucket/{000..009}.tar", f"file:{tmp_path}/00000.tar"])) == 11


# --- DDP --------------------------------------------------------------------------------------

DDP_SCRIPT = Path(__file__).with_name("ddp_shards_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_ranks_get_disjoint_data_and_the_same_number_of_batches(tmp_path: Path, repo_root: str) -> None:
    """Two processes in a gloo group, each with 2 DataLoader workers, read 8 shards for 2 epochs."""
    shards = tmp_path / "shards"
    every_key = set(write_good_shards(shards, shards=8, per_shard=5, size=16))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": os.pathsep.join([repo_root, str(Path(__file__).parent)])}
    ranks = [subprocess.Popen([sys.executable, str(DDP_SCRIPT), str(shards), str(tmp_path / f"rank{r}.json")],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for rank in ranks:
        output, _ = rank.communicate(timeout=300)
        assert rank.returncode == 0, output[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for mode in ("split", "resampled"):
        for epoch in range(2):
            batches0, batches1 = rank0[mode][epoch], rank1[mode][epoch]
            assert len(batches0) == len(batches1) == 7  # batches_per_epoch in the script
            keys0 = [key for batch in batches0 for key in batch]
            keys1 = [key for batch in batches1 for key in batch]
            assert set(keys0) | set(keys1) <= every_key
            if mode == "split":
                assert not set(keys0) & set(keys1)
                assert len(set(keys0)) == len(keys0) and len(set(keys1)) == len(keys1)  # 14 of each rank's 20
            else:
                assert keys0 != keys1  # independent draws, with replacement (so they may overlap)


def test_the_datamodule_takes_each_rank_from_the_trainer_and_checks_there_are_shards_enough(tmp_path: Path) -> None:
    write_good_shards(tmp_path, shards=3, per_shard=2)
    datamodule = ShardDataModule(str(tmp_path), ImageTextDecoder(32), batch_size=2, val_urls=str(tmp_path / "00000.tar"),
                                 num_workers=1, resampled=False)
    datamodule.trainer = SimpleNamespace(global_rank=1, world_size=2)
    datamodule.setup("fit")
    assert (datamodule.train_set.rank, datamodule.train_set.world_size) == (1, 2)
    assert (datamodule.val_set.rank, datamodule.val_set.world_size) == (0, 1)  # one val shard: every rank reads it
    datamodule.num_workers = 2
    with pytest.raises(ValueError, match=r"3 shards cannot be split over 2 rank\(s\) x 2 worker\(s\).*resampled=true"):
        datamodule.setup("fit")
