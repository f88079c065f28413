"""`python -m ldm.tools.make_shards` (and `export_shapes`): images with captions -> shards in img2dataset's
layout that data=laion reads back; bad inputs skipped and reported."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.laion import ImageTextDecoder, MetadataFilter
from ldm.data.shapes import ShapesDataset
from ldm.data.shards import ShardedDataset
from ldm.tools import export_shapes, make_shards
from shard_helpers import corrupt_jpeg, encode, pixels


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """A png, a jpg, a bmp (re-encoded on the way), one without a caption and one that is not an image."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(encode(pixels(0, 40, 30)))
    (root / "a.txt").write_text("a png\n")
    (root / "sub" / "b.jpg").write_bytes(encode(pixels(1, 20, 50), "JPEG"))
    (root / "sub" / "b.txt").write_text("a jpeg in a subfolder")
    Image.fromarray(pixels(2, 16, 16)).save(root / "c.bmp")
    (root / "c.txt").write_text("a bitmap")
    (root / "d.png").write_bytes(encode(pixels(3)))
    (root / "e.jpg").write_bytes(b"not an image at all")
    (root / "e.txt").write_text("a caption for nothing")
    return root


def test_a_folder_becomes_shards_with_the_files_bytes_captions_and_sizes(photo_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    assert make_shards.main([str(photo_folder), str(out), "--shard-size", "2", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "Wrote 3 samples in 2 shards; skipped: 1 no caption, 1 unreadable image." in printed.out
    assert f'data.urls="{out}/{{00000..00001}}.tar"' in printed.out
    assert "skipping" in printed.err and "e.jpg" in printed.err

    # keys number the images in sorted path order: a.png, c.bmp, sub/b.jpg
    first, second = _members(out / "00000.tar"), _members(out / "00001.tar")
    assert sorted(first) == ["000000000.json", "000000000.png", "000000000.txt", "000000001.json", "000000001.png", "000000001.txt"]
    assert first["000000000.png"] == (photo_folder / "a.png").read_bytes()
    assert first["000000000.txt"].decode() == "a png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first["000000001.png"]))), pixels(2, 16, 16))  # the bmp, as png
    assert second["000000002.jpg"] == (photo_folder / "sub" / "b.jpg").read_bytes()
    assert json.loads(second["000000002.json"]) == {"key": "000000002", "source": "sub/b.jpg", "width": 20, "height": 50}

    (batch,) = ShardedDataset(str(out), ImageTextDecoder(16, random_crop=False), batch_size=8, shard_shuffle=False,
                              drop_last=False)
    assert batch["caption"] == ["a png", "a bitmap", "a jpeg in a subfolder"]


def test_a_table_with_more_columns_keeps_them_as_metadata_for_the_filters(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = []
    for i, score in enumerate([4.5, 6.5, 7.0]):
        (tmp_path / "img" / f"{i}.png").write_bytes(encode(pixels(i)))
        rows.append({"file_name": f"img/{i}.png", "text": f"picture {i}", "aesthetic": score})
    table = tmp_path / "list.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text", "aesthetic"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "shards"
    assert make_shards.main([str(table), str(out), "--no-progress"]) == 0
    assert json.loads(_members(out / "00000.tar")["000000001.json"])["aesthetic"] == 6.5
    decoder = ImageTextDecoder(32, filters=MetadataFilter(min_aesthetic=6.0))
    (batch,) = ShardedDataset(str(out), decoder, batch_size=8, drop_last=False)
    assert sorted(batch["caption"]) == ["picture 1", "picture 2"]


def test_a_parquet_table(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "x.png").write_bytes(encode(pixels(5)))
    pq.write_table(pa.table({"path": [str(tmp_path / "x.png")], "caption": ["absolute path"], "punsafe": [0.01]}),
                   tmp_path / "list.parquet")
    out = tmp_path / "shards"
    assert make_shards.main([str(tmp_path / "list.parquet"), str(out), "--no-progress"]) == 0
    members = _members(out / "00000.tar")
    assert members["000000000.txt"].decode() == "absolute path"
    assert json.loads(members["000000000.json"])["punsafe"] == 0.01


def test_a_table_without_a_caption_column_names_its_columns(tmp_path: Path) -> None:
    table = tmp_path / "list.csv"
    table.write_text("file,words\nx.png,hello\n")
    with pytest.raises(SystemExit, match=r"no caption column among \['file', 'words'\].*--caption-column"):
        make_shards.main([str(table), str(tmp_path / "out")])
    (tmp_path / "x.png").write_bytes(encode(pixels(0)))
    assert make_shards.main([str(table), str(tmp_path / "out"), "--caption-column", "words", "--no-progress"]) == 0


def test_nothing_to_write_is_an_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.jpg").write_bytes(corrupt_jpeg()[:20])
    (tmp_path / "src" / "bad.txt").write_text("x")
    assert make_shards.main([str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "nothing written" in capsys.readouterr().err


def test_the_command_line_shapes_to_shards(tmp_path: Path, repo_root: str) -> None:
    """The README's two commands, as a user runs them."""
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=repo_root, capture_output=True, text=True, timeout=300)  # noqa: E731
    done = run("ldm.tools.export_shapes", str(tmp_path / "png"), "--length", "10", "--size", "24")
    assert done.returncode == 0, done.stderr[-2000:]
    done = run("ldm.tools.make_shards", str(tmp_path / "png"), str(tmp_path / "shards"), "--shard-size", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Wrote 10 samples in 3 shards" in done.stdout and "make_shards" in done.stderr  # the progress bar
    shapes = ShapesDataset(size=24, length=10, cache=False)
    (batch,) = ShardedDataset(str(tmp_path / "shards"), ImageTextDecoder(24, random_crop=False), batch_size=10,
                              shard_shuffle=False, drop_last=False)
    assert batch["caption"] == [shapes.caption(i) for i in range(10)]
    assert np.array_equal(((batch["image"][3].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(), shapes.image_uint8(3))


def test_export_shapes_writes_images_and_captions(tmp_path: Path) -> None:
    export_shapes.export(tmp_path, length=3, size=16, split="val", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"val_{i:06d}.{ext}" for i in range(3) for ext in ("png", "txt")]
    assert (tmp_path / "val_000001.txt").read_text().strip() == ShapesDataset(size=16, length=3, split="val", cache=False).caption(1)
