"""Does a trained text-to-image model draw what its prompt says? Measured on the shapes dataset.
The command line over ``ldm.evaluation.prompt_following``, which holds the measurement.

Two modes:

``detector``: first show that the procedural detector (``ldm.evaluation.shapes_detector``) can be
trusted to judge generated images: it reads the attributes of real val-split shapes back both from
the clean images and from the autoencoder's reconstructions (posterior mean -> decode), whose look
the generator's samples share. Reconstruction PSNR is printed too.

    python benchmarks/prompt_following.py detector --autoencoder-ckpt runs/autoencoder/<run>/checkpoints/last.ckpt

``generate``: draw N captions from attribute combinations (a share of them from the (colour, shape)
pairs held out of training, ``DEFAULT_HOLDOUT``; the rest from the val split's distribution), sample
one image per caption at each guidance scale from the same seeds, and score the detector's reading
of each image against its caption: a table of guidance scale x attribute accuracy for seen and
held-out combinations and overall, with chance levels and binomial 95% half-widths, then one JSON
line with every number.

    python benchmarks/prompt_following.py generate --ckpt runs/ldm/<run>/checkpoints/last.ckpt \
        --n 256 --guidance 1 5 --steps 25 --sampler ddim --grid prompt_following.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from ldm.diffusion import SAMPLERS
from ldm.evaluation.prompt_following import detector_report, evaluate_detector, evaluate_generation, generation_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    detector = modes.add_parser("detector", help="the detector on clean images and on the autoencoder's reconstructions")
    detector.add_argument("--autoencoder-ckpt", required=True)
    detector.add_argument("--n", type=int, default=512)
    detector.add_argument("--size", type=int, default=32)
    detector.add_argument("--batch-size", type=int, default=64)
    detector.add_argument("--seed", type=int, default=0, help="seed of the val split's images")
    detector.add_argument("--device", default="auto")
    generate = modes.add_parser("generate", help="prompt following of a stage-2 checkpoint")
    generate.add_argument("--ckpt", required=True)
    generate.add_argument("--n", type=int, default=256)
    generate.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0])
    generate.add_argument("--guidance-rescale", type=float, default=0.0, help="Lin et al.'s φ; 0 is plain guidance")
    generate.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                          help="guide only timesteps LO <= t <= HI (Kynkäänniemi et al. 2024); default: every step")
    generate.add_argument("--steps", type=int, default=25)
    generate.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    generate.add_argument("--batch-size", type=int, default=64)
    generate.add_argument("--seed", type=int, default=0, help="draws the captions; caption k is sampled with seed + k")
    generate.add_argument("--holdout-fraction", type=float, default=0.25)
    generate.add_argument("--size", type=int, default=None, help="default: the autoencoder's training resolution")
    generate.add_argument("--device", default="auto")
    generate.add_argument("--grid", default=None, help="PNG of the first 32 samples per guidance scale")
    generate.add_argument("--no-progress", action="store_true")
    generate.add_argument("--no-ema", action="store_true", help="sample with the trained weights, not their EMA")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Prints the report, then the result as one JSON line; returns the result."""
    args = parse_args(argv)
    if args.mode == "detector":
        result = evaluate_detector(
            args.autoencoder_ckpt, n=args.n, size=args.size, batch_size=args.batch_size, seed=args.seed, device=args.device
        )
        print(detector_report(result))
    else:
        result = evaluate_generation(
            args.ckpt,
            n=args.n,
            guidance_scales=args.guidance,
            guidance_rescale=args.guidance_rescale,
            guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
            steps=args.steps,
            sampler_name=args.sampler,
            batch_size=args.batch_size,
            seed=args.seed,
            holdout_fraction=args.holdout_fraction,
            size=args.size,
            device=args.device,
            grid=args.grid,
            progress=not args.no_progress,
            use_ema=not args.no_ema,
        )
        print(generation_report(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
