"""Images with captions -> webdataset tar shards in img2dataset's layout, for ``data=laion``.

    python -m ldm.tools.make_shards photos/ shards/ --shard-size 1000      # NAME.jpg + NAME.txt side by side
    python -m ldm.tools.make_shards photos.csv shards/                      # a table: path, caption[, more columns]
    python -m ldm.tools.make_shards photos.parquet shards/ --path-column url_local --caption-column TEXT

Each sample is ``KEY.jpg|.png|.webp`` (the file's own bytes; other formats are re-encoded as PNG),
``KEY.txt`` (the caption) and ``KEY.json`` (``width``, ``height``, the source path and any further
columns of the table, such as an aesthetic score). Keys number the samples in source order. An image
that does not open, or one without a caption, is skipped and counted; the summary says how many.
A table (.csv/.tsv with a header row, .jsonl, or .parquet with pyarrow) names its image paths relative
to its own folder or absolutely.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ldm.data.folder import DECODE_ERRORS, find_images

PATH_COLUMNS: tuple[str, ...] = ("path", "file_name", "filename", "file", "image")
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "text", "txt")
KEPT_FORMATS: dict[str, str] = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Item:
    """One image to write: its file, caption (None if it has none) and extra metadata."""

    path: Path
    caption: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def items_from_folder(root: Path) -> list[Item]:
    """Every image below ``root`` (sorted), its caption from ``NAME.txt`` beside it."""
    items = []
    for path in find_images(root):
        text = path.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8").strip() if text.is_file() else None
        items.append(Item(path, caption, {"source": path.relative_to(root).as_posix()}))
    return items


def _typed(value: str | None) -> Any:
    """A CSV cell as the number it spells (so filters can compare scores), else as text."""
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


def _rows(table: Path) -> list[dict[str, Any]]:
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise SystemExit("reading .parquet needs pyarrow: pip install pyarrow (or pip install -e '.[parquet]')") from error
        return pq.read_table(table).to_pylist()
    if suffix == ".jsonl":
        with table.open(encoding="utf-8") as lines:
            return [json.loads(line) for line in lines if line.strip()]
    if suffix in (".csv", ".tsv"):
        with table.open(encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            return [{key: _typed(value) for key, value in row.items()} for row in rows]
    raise SystemExit(f"{table}: a table must be .csv, .tsv, .jsonl or .parquet")


def _column(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, table: Path) -> str:
    if wanted is not None:
        if wanted not in names:
            raise SystemExit(f"{table} has no column {wanted!r}; its columns: {names}")
        return wanted
    found = next((name for name in names if name.lower() in candidates), None)
    if found is None:
        raise SystemExit(f"{table}: no {what} column among {names}; name one with --{what}-column (looked for {candidates})")
    return found


def items_from_table(table: Path, path_column: str | None = None, caption_column: str | None = None) -> list[Item]:
    """A row per image; columns other than the path and caption go into the metadata."""
    rows = _rows(table)
    if not rows:
        return []
    names = list(rows[0])
    path_key = _column(names, path_column, PATH_COLUMNS, "path", table)
    caption_key = _column(names, caption_column, CAPTION_COLUMNS, "caption", table)
    items = []
    for row in rows:
        path = Path(str(row[path_key]))
        caption = row.get(caption_key)
        caption = str(caption).strip() if caption is not None else None
        extra = {k: v for k, v in row.items() if k not in (path_key, caption_key)}
        items.append(Item(path if path.is_absolute() else table.parent / path, caption, {"source": str(row[path_key]), **extra}))
    return items


def _encoded(path: Path) -> tuple[str, bytes, int, int]:
    """(extension, bytes, width, height): the file as it is for JPEG/PNG/WebP, else re-encoded as PNG."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        extension = KEPT_FORMATS.get(image.format or "")
        if extension is None:
            png = io.BytesIO()
            image.save(png, format="PNG")
            return "png", png.getvalue(), width, height
    return extension, data, width, height


def write_shards(items: list[Item], out: Path, shard_size: int, progress: bool = True) -> tuple[int, int, Counter[str]]:
    """Writes ``out/00000.tar, ...``; returns (samples written, shards, skipped by reason)."""
    if shard_size < 1:
        raise SystemExit(f"--shard-size must be positive, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    skipped: Counter[str] = Counter()
    written = 0
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for item in tqdm(items, unit="img", desc="make_shards", disable=not progress):
            if not item.caption:
                skipped["no caption"] += 1
                continue
            try:
                extension, data, width, height = _encoded(item.path)
            except (*DECODE_ERRORS, FileNotFoundError) as error:
                skipped["unreadable image"] += 1
                tqdm.write(f"skipping {item.path}: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            key = f"{written:09d}"
            metadata = {"key": key, **item.metadata, "width": width, "height": height}
            sink.write({"__key__": key, extension: data, "txt": item.caption, "json": metadata})
            written += 1
        shards = sink.shard
    return written, shards, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.tools.make_shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a folder of images with NAME.txt captions, or a .csv/.tsv/.jsonl/.parquet table")
    parser.add_argument("out", type=Path, help="output folder for 00000.tar, 00001.tar, ...")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--path-column", help="the table's image path column (default: path/file_name/filename/file/image)")
    parser.add_argument("--caption-column", help="the table's caption column (default: caption/text/txt)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.src.is_dir():
        items = items_from_folder(args.src)
    elif args.src.is_file():
        items = items_from_table(args.src, args.path_column, args.caption_column)
    else:
        raise SystemExit(f"{args.src} is neither a folder nor a table file")
    written, shards, skipped = write_shards(items, args.out, args.shard_size, progress=not args.no_progress)
    detail = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"
    if written == 0:
        print(f"error: nothing written from {args.src} ({len(items)} images found; skipped: {detail})", file=sys.stderr)
        return 1
    print(f"Wrote {written} samples in {shards} shards; skipped: {detail}.")
    print(f"Train on them with: data=laion data.urls={args.out}   (every .tar in it), or a pattern, quoted for Hydra: "
          f"'data.urls=\"{args.out}/{{00000..{shards - 1:05d}}}.tar\"'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
