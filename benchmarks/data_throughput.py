"""Data throughput: the shard pipeline against a plain PIL loop, and stage 2 with and without the latent cache.

1. Images per second for ONE worker (in-process, one thread) to turn shards into training tensors —
   tar streaming, JPEG decode, resize, random crop, to [-1, 1] — against the named peers over the very
   same files: a plain PIL decode loop (``Image.open(f).convert("RGB")``, the limit the issue names)
   and a PIL loop that also resizes and crops as we do (the same work, without the pipeline).
   The images are synthetic photo-like JPEGs (smooth colour fields plus texture) of 320–640 px a side.
2. Stage-2 training steps per second with the tiny configs, from image shards (autoencoder and text
   encoder run every step) and from a latent cache of the same images (made here with
   ``ldm.tools.cache_latents``), same module, batch size and data loading (in-process).

Rates are per CPU second of this process (``time.process_time``; everything runs in it, data loading
included): other load on a shared machine then does not distort them, and on an idle machine with one
thread they equal wall-clock rates.

    python benchmarks/data_throughput.py                    # defaults below; ~2 CPU minutes on 1 thread
    python benchmarks/data_throughput.py --images 512 --image-size 512 --steps 50 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.laion import ImageTextDecoder
from ldm.data.shards import ShardedDataset
from ldm.data.transforms import resize_and_crop, uint8_to_model_range
from ldm.tools import export_shapes, make_shards
from ldm.tools.cache_latents import cache_latents

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour fields (upsampled coarse noise) plus fine texture: compresses like a photo."""
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    texture = rng.normal(0, 12, (height, width, 3))
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(320, 641, 2))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(photo_like(rng, width, height)).save(path, quality=90)
        path.with_suffix(".txt").write_text(f"a synthetic photo number {i}")
        paths.append(path)
    return paths


def rate(run: Callable[[], int], repeats: int = 3) -> float:
    """Items per CPU second of ``run`` (which returns how many items it did): the best of ``repeats``."""
    best = 0.0
    for _ in range(repeats):
        start = time.process_time()
        n = run()
        best = max(best, n / (time.process_time() - start))
    return best


def pipeline_rates(root: Path, count: int, size: int) -> dict[str, float]:
    paths = make_photos(root / "photos", count)
    make_shards.write_shards(make_shards.items_from_folder(root / "photos"), root / "photo_shards", 100, progress=False)
    megabytes = sum(p.stat().st_size for p in paths) / 2**20
    print(f"{count} JPEGs, {megabytes / count * 1024:.0f} KB each on average, 320-640 px a side -> {size}x{size}")

    def pil_decode() -> int:
        for path in paths:
            with Image.open(path) as image:
                image.convert("RGB")
        return len(paths)

    def pil_decode_resize_crop() -> int:
        for path in paths:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
            uint8_to_model_range(np.asarray(resize_and_crop(rgb, size, random_crop=True)))
        return len(paths)

    dataset = ShardedDataset(str(root / "photo_shards"), ImageTextDecoder(size, random_crop=True), batch_size=32,
                             shuffle_buffer=256, drop_last=False)

    def ours() -> int:
        return sum(len(batch["key"]) for batch in dataset)

    return {"PIL decode loop (the limit)": rate(pil_decode), "PIL decode+resize+crop loop": rate(pil_decode_resize_crop),
            "shards -> tensors (ours, 1 worker)": rate(ours)}


def fake_stage1_checkpoint(path: Path) -> None:
    """A stage-1 checkpoint of the tiny autoencoder at random init: the weights do not change the timing."""
    model_cfg = OmegaConf.to_container(OmegaConf.load(Path(CONFIGS) / "model" / "autoencoder_tiny.yaml"))
    autoencoder = hydra.utils.instantiate(model_cfg)
    state = {f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}
    torch.save({"ldm_stage": "autoencoder", "hyper_parameters": {"stage": "autoencoder", "model": model_cfg}, "state_dict": state}, path)


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = time.process_time()


def steps_per_second(overrides: list[str], warmup: int, steps: int) -> float:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    pl.seed_everything(0, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.stage.module)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(accelerator="cpu", max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    return steps / (timer.end - timer.start)


def cache_rates(root: Path, count: int, batch_size: int, warmup: int, steps: int) -> dict[str, float]:
    export_shapes.export(root / "shapes", length=count, size=32, progress=False)
    make_shards.write_shards(make_shards.items_from_folder(root / "shapes"), root / "shape_shards", 128, progress=False)
    ckpt = root / "autoencoder.ckpt"
    fake_stage1_checkpoint(ckpt)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="cache_latents", overrides=[f"urls={root / 'shape_shards'}", f"out={root / 'cache'}",
                                                              f"autoencoder_ckpt={ckpt}", "image_size=32", "num_workers=0"])
    cache_latents(cfg)
    common = ["stage=ldm", "image_size=32", f"autoencoder_ckpt={ckpt}", f"data.batch_size={batch_size}", "data.num_workers=0",
              f"data.batches_per_epoch={warmup + steps}", "stage.module.scale_factor=1.0", "stage.module.lr_warmup_steps=0"]
    return {"stage 2 from image shards (encoders every step)": steps_per_second([*common, "data=laion", f"data.urls={root / 'shape_shards'}"], warmup, steps),
            "stage 2 from the latent cache": steps_per_second([*common, "data=latents", f"data.urls={root / 'cache'}"], warmup, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="synthetic JPEGs for the pipeline benchmark")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shapes", type=int, default=512, help="shapes images for the cache benchmark")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")

    with tempfile.TemporaryDirectory() as tmp:
        images = pipeline_rates(Path(tmp) / "pipeline", args.images, args.image_size)
        limit = images["PIL decode loop (the limit)"]
        for name, value in images.items():
            print(f"  {name:<52} {value:8.1f} images/CPU-s   {value / limit:5.2f}x the PIL decode loop")

        print(f"\nstage 2, tiny configs (autoencoder_tiny, unet_tiny, tiny text encoder), 32x32, batch {args.batch_size}, "
              f"{args.steps} steps after {args.warmup}:")
        steps = cache_rates(Path(tmp) / "cache", args.shapes, args.batch_size, args.warmup, args.steps)
        baseline = steps["stage 2 from image shards (encoders every step)"]
        for name, value in steps.items():
            print(f"  {name:<52} {value:8.2f} steps/CPU-s   {value / baseline:5.2f}x from image shards")


if __name__ == "__main__":
    main()
