"""One grid image, one row per sampler, same prompt and seeds in every row (the README figure).

    python benchmarks/sampler_grid.py runs/ldm/<run>/checkpoints/last.ckpt \
        --prompt "a large red circle in the center on a white background" --seeds 0 1 2 3 --out samplers.png
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from ldm.diffusion import SAMPLERS, build_sampler
from ldm.inference import generate_images, load_model
from ldm.inference.images import png_info, to_pil
from ldm.inference.sample import pick_device

LABEL_WIDTH = 80


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--prompt", default="a large red circle in the center on a white background")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m"], choices=sorted(SAMPLERS))
    parser.add_argument("--steps", type=int, default=25, help="steps for every sampler except ddpm")
    parser.add_argument("--ddpm-steps", type=int, default=250)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the autoencoder's resolution)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="samplers.png")
    args = parser.parse_args()

    model = load_model(args.ckpt, pick_device(args.device))
    size = args.size or model.image_size
    rows = []
    for name in args.samplers:
        steps = args.ddpm_steps if name == "ddpm" else args.steps
        sampler = build_sampler(name, model.schedule, steps)
        images = generate_images(model, sampler, [args.prompt] * len(args.seeds), args.seeds, height=size, width=size, guidance_scale=args.guidance)
        rows.append((f"{name}\n{steps} steps", make_grid((images.float().cpu() + 1) / 2, nrow=len(args.seeds), padding=2, pad_value=1.0)))

    height = rows[0][1].shape[1]
    canvas = Image.new("RGB", (LABEL_WIDTH + rows[0][1].shape[2], height * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, row) in enumerate(rows):
        canvas.paste(to_pil(row), (LABEL_WIDTH, i * height))
        draw.multiline_text((4, i * height + height // 2 - 10), label, fill="black")
    settings = {"prompt": args.prompt, "seeds": args.seeds, "guidance_scale": args.guidance, "checkpoint": args.ckpt, "samplers": args.samplers}
    canvas.save(args.out, pnginfo=png_info(settings))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
