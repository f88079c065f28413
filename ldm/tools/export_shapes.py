"""The embedded shapes dataset as a folder of PNGs with ``NAME.txt`` captions, e.g. to make shards from:

    python -m ldm.tools.export_shapes data/shapes --length 2000 --size 64
    python -m ldm.tools.make_shards data/shapes data/shapes_shards --shard-size 250
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ldm.data.shapes import SPLITS, ShapesDataset


def export(out: Path, length: int, size: int, split: str = "train", seed: int = 0, progress: bool = True) -> None:
    dataset = ShapesDataset(size=size, length=length, split=split, seed=seed, cache=False)
    out.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(length), unit="img", desc="export_shapes", disable=not progress):
        name = out / f"{split}_{index:06d}"
        Image.fromarray(dataset.image_uint8(index)).save(name.with_suffix(".png"))
        name.with_suffix(".txt").write_text(dataset.caption(index) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.tools.export_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    export(args.out, args.length, args.size, args.split, args.seed, progress=not args.no_progress)
    print(f"Wrote {args.length} images with captions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
