"""The shapes measurement of a class-conditional, unconditional, inpainting or super-resolution model,
chosen by the checkpoint's conditioning. The command line over ``ldm.evaluation.conditioning``.

    python benchmarks/conditioning_eval.py runs/ldm/<class run>/checkpoints/last.ckpt --n 32 --guidance 5   # n per class
    python benchmarks/conditioning_eval.py runs/ldm/<uncond run>/checkpoints/last.ckpt --n 4096
    python benchmarks/conditioning_eval.py runs/ldm/<inpaint run>/checkpoints/last.ckpt --n 256 --guidance 5
    python benchmarks/conditioning_eval.py runs/ldm/<sr run>/checkpoints/last.ckpt --n 256

Prints the figures as one JSON line (``--json PATH`` writes them too; ``--grid PATH`` a PNG of the
samples: a row per class, 64 unconditional samples, input / masked / output rows, or input / bicubic /
model / original rows). What each must reach
(docs/conditioning.md): class ``accuracy`` >= 0.95; none ``max_tv`` <= 0.05; inpaint ``kept_psnr_margin``
>= -1 dB and ``asked_colour`` >= 0.90; superres ``gain_db`` >= 3.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import save_image

from ldm.diffusion import SAMPLERS
from ldm.evaluation.conditioning import GRID_COLUMNS, evaluate
from ldm.inference import load_model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=256, help="images (class-conditional: images per class)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale (class, inpaint)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="guide only at timesteps LO <= t <= HI (class, inpaint; e.g. 0 400)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None, help="PNG of the samples (GRID_COLUMNS per row)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    model = load_model(args.ckpt, args.device)
    start = time.process_time()
    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    result = evaluate(model, args.n, guidance_scale=args.guidance, guidance_interval=interval, steps=args.steps, sampler=args.sampler,
                      seed=args.seed, batch_size=args.batch_size)
    grid = result.pop("grid")
    if args.grid:
        save_image((grid + 1) / 2, args.grid, nrow=GRID_COLUMNS, padding=2, pad_value=1.0)
    result.update(checkpoint=str(Path(args.ckpt).resolve()), global_step=model.metadata.get("global_step"),
                  cpu_seconds=round(time.process_time() - start, 1))
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
