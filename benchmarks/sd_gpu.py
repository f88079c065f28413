"""SD-size GPU figures, ours beside diffusers with the same weights in the same run.

`train`: training images per second of the `sd15` UNet (859.5M parameters) at 256² and 512² image
sizes (32² and 64² latents), bf16 autocast, SDPA attention, fused AdamW, fp32 master weights: a full
optimizer step per batch. Beside it, diffusers' `UNet2DConditionModel` holding the same weights
(exported through diffusers' own converter, `ldm.checkpoints.diffusers`). MFU counts the model FLOPs the
issue gives (fwd+bwd ≈ 0.54 TFLOP per image at 256², 2.41 at 512²) against a dense bf16 peak
(`--peak-tflops`, 989 for an H100 SXM); `torch.utils.flop_counter` measures them too, as a check.

`sample`: 512² text-to-image latency, 50 DDIM steps, classifier-free guidance 7.5 (one batched UNet
call per step), decoded by the SD-size autoencoder (`kl_f8`), both at random init, weights cast to
bf16 or fp16. Ours (`ldm.inference.denoise_latents`: `DDIMSampler` over a guided `Denoiser`, then `KLAutoencoder.decode`) beside
diffusers' `StableDiffusionPipeline` built from the exported UNet and autoencoder, with the same
prompt embeddings and starting noise. The text encoder is timed apart (our OpenCLIP ViT-L/14 tower).

Training also runs at the largest size with channels-last memory format (both models), searches the
largest batch that fits (doubling from `--train-batch` up to `--max-batch`) and, with `--compile`, times
ours compiled in channels-last at that batch. The attention path (SDPA and its enabled backends) is
recorded with the figures.

`shapes`: the tiny shapes recipe (`stage=ldm trainer=gpu`, `unet_tiny`) in steps per second, through the
real trainer and configs on the shapes data, and beside it the framework against a plain PyTorch loop
on the same pre-made batches (`benchmarks/framework_overhead.py` on the GPU).

`fsdp`: `python train.py stage=ldm trainer=fsdp trainer.devices=1` actually run (wrapping, bf16 mixed
precision, the full-state-dict checkpoint), then resumed by the same command to more steps; the
checkpoint is checked to be a full state dict that `ldm.inference.load_model` reads without FSDP.
Lightning runs FSDP on GPUs only, so on a CPU the same commands run with `trainer=cpu`.

    python benchmarks/sd_gpu.py all --compile --deadline 420 --json benchmarks/results/sd_gpu_<gpu>_<date>.json   # ~8 min, H100
    python benchmarks/sd_gpu.py all --tiny --device cpu            # a smoke run of the script itself

`all` runs shapes, sample, fsdp, train in that order. `--compile` adds `torch.compile` runs of ours
(compile time reported apart): training as above, sampling at the first dtype and batch with
`mode="reduce-overhead"` (CUDA graphs; `ldm.inference.compiled`, the `compile=true` of sample.py).
Each part (and each size, dtype and compile run) stops before starting once `--deadline` seconds
have passed, so a timed lease ends with the figures it has.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from ldm.checkpoints.diffusers import autoencoder_to_diffusers, unet_to_diffusers
from ldm.diffusion import DDIMSampler, NoiseSchedule
from ldm.inference import denoise_latents, load_model
from ldm.inference.compiled import CompiledUNet
from ldm.modules.autoencoder import KLAutoencoder
from ldm.modules.unet import UNetModel

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "model"
TRAIN_TFLOP_PER_IMAGE = {256: 0.54, 512: 2.41}
SCALE_FACTOR = 0.18215
BETA_START, BETA_END = 0.00085, 0.012
TINY_UNET = {"model_channels": 32, "context_dim": 48}
TINY_VAE = {"ch": 32}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
START = time.perf_counter()


def model_config(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config.update(overrides)
    return config


def build(name: str, overrides: dict[str, Any], device: str) -> tuple[nn.Module, dict[str, Any]]:
    config = model_config(name, overrides)
    kind = UNetModel if name.startswith("sd") else KLAutoencoder
    torch.manual_seed(0)
    with torch.device(device):
        model = kind(**{k: v for k, v in config.items() if k != "_target_"})
    return model, config


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, Any]:
    """Best wall time of `repeats` calls (after the caller's warm-up), synchronised."""
    best, out = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def late(deadline: float) -> bool:
    return time.perf_counter() - START > deadline


def report(results: dict[str, Any], key: str, value: dict[str, Any], json_path: Path | None) -> None:
    results[key] = value
    print(f"{key}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------------------- training


def attention_backends() -> dict[str, Any]:
    """Which fused attention kernels SDPA may pick (both UNets call F.scaled_dot_product_attention)."""
    if not torch.cuda.is_available():
        return {"sdpa": True}
    return {"sdpa": True, "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(), "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}


def training_step(model: nn.Module, diffusers_api: bool, optimizer: torch.optim.Optimizer, x: Tensor, t: Tensor, context: Tensor, target: Tensor) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = model(x, t, encoder_hidden_states=context).sample if diffusers_api else model(x, t, context)
    F.mse_loss(out.float(), target).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measured_tflop_per_image(model: nn.Module, diffusers_api: bool, latent: int, context_dim: int, device: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 4, latent, latent, device=device)
    context = torch.randn(1, 77, context_dim, device=device)
    t = torch.tensor([500], device=device)
    with FlopCounterMode(display=False) as counter, torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = model(x, t, encoder_hidden_states=context).sample if diffusers_api else model(x, t, context)
        out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e12


def with_mfu(figures: dict[str, Any], image_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Adds model-FLOPs utilisation where the issue gives the FLOPs of an image of this size."""
    if image_size in TRAIN_TFLOP_PER_IMAGE and not args.tiny:
        figures["mfu"] = figures["img_per_s"] * TRAIN_TFLOP_PER_IMAGE[image_size] / args.peak_tflops
    return figures


def training_throughput(model: nn.Module, diffusers_api: bool, batch: int, latent: int, context_dim: int, device: str, steps: int, warmup: int,
                        channels_last: bool = False) -> dict[str, Any]:
    generator = torch.Generator(device=device).manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 4, latent, latent, device=device, generator=generator).contiguous(memory_format=memory_format)
    target = torch.randn(batch, 4, latent, latent, device=device, generator=generator).contiguous(memory_format=memory_format)
    context = torch.randn(batch, 77, context_dim, device=device, generator=generator)
    t = torch.randint(0, 1000, (batch,), device=device, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        training_step(model, diffusers_api, optimizer, x, t, context, target)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    seconds, _ = timed(lambda: [training_step(model, diffusers_api, optimizer, x, t, context, target) for _ in range(steps)], device, 1)
    del optimizer
    return {"batch": batch, "img_per_s": batch * steps / seconds, "step_ms": 1e3 * seconds / steps, "warmup_s": warmup_s,
            "peak_GiB": peak_memory_gib(device), "channels_last": channels_last}


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_batch(model: nn.Module, start: int, limit: int, latent: int, context_dim: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Doubles the batch from 2 x `start` while a training step fits (channels-last, as the best layout);
    the figures of the largest that fitted."""
    best, batch = None, 2 * start
    while batch <= limit and not late(args.deadline):
        try:
            best = training_throughput(model, False, batch, latent, context_dim, args.device, max(3, args.train_steps // 2), 1, channels_last=True)
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            print(f"batch {batch} does not fit", flush=True)
            break
        finally:
            model.zero_grad(set_to_none=True)
            reset_peak(args.device)
        batch *= 2
    return best


def run_training(args: argparse.Namespace, results: dict[str, Any], json_path: Path | None) -> None:
    overrides = TINY_UNET if args.tiny else {}
    unet, config = build("sd15", overrides, args.device)
    theirs = unet_to_diffusers(copy.deepcopy(unet), config)  # its own copy: both models take optimizer steps
    context_dim = config["context_dim"]
    print(f"sd15 UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters; diffusers twin built by its converter", flush=True)
    report(results, "train/attention", attention_backends(), json_path)
    for image_size, batch in zip(args.sizes, args.train_batch):
        latent = image_size // 8
        if late(args.deadline):
            print(f"deadline passed: training at {image_size}² skipped", flush=True)
            break
        for name, model, diffusers_api in (("ours", unet, False), ("diffusers", theirs, True)):
            model.train()
            figures = training_throughput(model, diffusers_api, batch, latent, context_dim, args.device, args.train_steps, args.warmup)
            figures["tflop_per_image_counted"] = measured_tflop_per_image(model, diffusers_api, latent, context_dim, args.device)
            report(results, f"train/{image_size}/{name}", with_mfu(figures, image_size, args), json_path)
        ratio = results[f"train/{image_size}/ours"]["img_per_s"] / results[f"train/{image_size}/diffusers"]["img_per_s"]
        print(f"train {image_size}²: ours/diffusers throughput {ratio:.3f}", flush=True)
        if image_size != max(args.sizes):
            continue
        for name, model, diffusers_api in (("ours", unet, False), ("diffusers", theirs, True)):
            if late(args.deadline):
                break
            model.to(memory_format=torch.channels_last)
            figures = training_throughput(model, diffusers_api, batch, latent, context_dim, args.device, args.train_steps, args.warmup, channels_last=True)
            report(results, f"train/{image_size}/{name}_channels_last", with_mfu(figures, image_size, args), json_path)
        best = largest_batch(unet, batch, 2 * batch if args.tiny else args.max_batch, latent, context_dim, args)
        if best is not None:
            report(results, f"train/{image_size}/ours_largest_batch", with_mfu(best, image_size, args), json_path)
        if args.compile and not late(args.deadline):
            compiled = torch.compile(unet)
            compile_batch = best["batch"] if best is not None else batch
            start = time.perf_counter()
            figures = training_throughput(compiled, False, compile_batch, latent, context_dim, args.device, args.train_steps, args.warmup, channels_last=True)
            figures["compile_and_warmup_s"] = time.perf_counter() - start
            report(results, f"train/{image_size}/ours_compiled_channels_last", with_mfu(figures, image_size, args), json_path)
    del unet, theirs
    reset_peak(args.device)


# ----------------------------------------------------------------------------------------- sampling


def ddim_sampler(steps: int) -> DDIMSampler:
    """SD's DDIM grid (leading, offset 1), which StableDiffusionPipeline enforces on its scheduler."""
    schedule = NoiseSchedule(kind="scaled_linear", beta_start=BETA_START, beta_end=BETA_END)
    return DDIMSampler(schedule, steps, eta=0.0, spacing="leading", steps_offset=1)


def diffusers_pipeline(unet: nn.Module, vae: nn.Module) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=BETA_START, beta_end=BETA_END, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_text_to_image(unet: nn.Module, vae: KLAutoencoder, sampler: DDIMSampler, x_T: Tensor, context: Tensor, uncond: Tensor, scale: float) -> Tensor:
    z = denoise_latents(unet, sampler, context, uncond, scale, x_T, prediction="eps")
    dtype = next(vae.parameters()).dtype
    return (vae.decode((z / SCALE_FACTOR).to(dtype)).float() * 0.5 + 0.5).clamp(0, 1)


def run_sampling(args: argparse.Namespace, results: dict[str, Any], json_path: Path | None) -> None:
    unet32, unet_config = build("sd15", TINY_UNET if args.tiny else {}, args.device)
    vae32, _ = build("kl_f8", TINY_VAE if args.tiny else {}, args.device)
    context_dim, size = unet_config["context_dim"], args.image_size
    guidance = 7.5
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        unet, vae = unet32.to(dtype).eval(), vae32.to(dtype).eval()
        pipe = diffusers_pipeline(unet_to_diffusers(unet, unet_config).to(args.device), autoencoder_to_diffusers(vae).to(args.device))
        for batch in args.sample_batch:
            if late(args.deadline):
                print(f"deadline passed: sampling {dtype_name} batch {batch} skipped", flush=True)
                continue
            generator = torch.Generator(device=args.device).manual_seed(batch)
            x_T = torch.randn(batch, 4, size // 8, size // 8, device=args.device, generator=generator)
            context = torch.randn(batch, 77, context_dim, device=args.device, generator=generator)
            uncond = torch.randn(batch, 77, context_dim, device=args.device, generator=generator)
            sampler = ddim_sampler(args.sample_steps)

            def ours() -> Tensor:
                return our_text_to_image(unet, vae, sampler, x_T, context, uncond, guidance)

            def theirs() -> Tensor:
                return pipe(
                    prompt_embeds=context.to(dtype), negative_prompt_embeds=uncond.to(dtype), latents=x_T.to(dtype),
                    num_inference_steps=args.sample_steps, guidance_scale=guidance, height=size, width=size, output_type="pt",
                ).images.float()

            with torch.inference_mode():
                reset_peak(args.device)
                ours()
                ours_s, ours_images = timed(ours, args.device, args.repeats)
                ours_peak = peak_memory_gib(args.device)
                theirs()
                theirs_s, theirs_images = timed(theirs, args.device, args.repeats)
            report(results, f"sample/{size}/{dtype_name}/batch{batch}", {
                "ours_s": ours_s, "diffusers_s": theirs_s, "ours_over_diffusers": ours_s / theirs_s,
                "ours_ms_per_step": 1e3 * ours_s / args.sample_steps, "ours_peak_GiB": ours_peak,
                "max_abs_image_diff": (ours_images - theirs_images).abs().max().item(),
            }, json_path)
            if args.compile and batch == args.sample_batch[0] and dtype_name == args.dtypes[0] and not late(args.deadline):
                compiled = CompiledUNet(unet, mode="reduce-overhead" if args.device.startswith("cuda") else None)
                with torch.inference_mode():
                    start = time.perf_counter()
                    our_text_to_image(compiled, vae, sampler, x_T, context, uncond, guidance)
                    synchronize(args.device)
                    compile_s = time.perf_counter() - start
                    compiled_s, _ = timed(lambda: our_text_to_image(compiled, vae, sampler, x_T, context, uncond, guidance), args.device, args.repeats)
                report(results, f"sample/{size}/{dtype_name}/batch{batch}/ours_compiled", {
                    "ours_s": compiled_s, "first_call_s": compile_s, "mode": compiled.options.get("mode"),
                    "diffusers_eager_s": theirs_s, "ours_over_diffusers_eager": compiled_s / theirs_s}, json_path)
        del pipe
    if not args.tiny and not late(args.deadline):
        time_text_encoder(args, results, json_path)


def time_text_encoder(args: argparse.Namespace, results: dict[str, Any], json_path: Path | None) -> None:
    try:
        from ldm.modules.text_encoder import OpenCLIPTextEncoder
    except ImportError as error:
        print(f"text encoder not timed: {error}", flush=True)
        return
    encoder = OpenCLIPTextEncoder(arch="ViT-L-14", pretrained=None, layer="last").to(args.device)
    captions = ["a photograph of an astronaut riding a horse"] * max(args.sample_batch)
    with torch.inference_mode(), torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
        encoder(captions)
        seconds, _ = timed(lambda: encoder(captions), args.device, args.repeats)
    report(results, "text_encoder/vit_l14", {"batch": len(captions), "ms": 1e3 * seconds}, json_path)


# ----------------------------------------------------------------------------------------- shapes recipe


def run_shapes(args: argparse.Namespace, results: dict[str, Any], json_path: Path | None) -> None:
    import framework_overhead as fo  # benchmarks/ is on sys.path when this script runs

    root = Path(tempfile.mkdtemp(prefix="sd_gpu_shapes_"))
    steps, repeats = (5, 1) if args.tiny else (args.shapes_steps, 3)
    options = argparse.Namespace(device=args.device, repeats=repeats, override=[], profile=False, top=0)
    case = fo.Case("stage 2, unet_tiny", ["stage=ldm"], 32, steps, 3 if args.tiny else 20)
    fo.run_case(case, options, root)
    framework = statistics.median(t.wall for t in case.fw_times)
    plain = statistics.median(t.wall for t in case.plain_times)
    report(results, "shapes/framework_vs_plain", {
        "framework_steps_per_s": 1 / framework, "plain_steps_per_s": 1 / plain, "framework_over_plain_time": framework / plain,
        "batch": case.batch_size, "steps": steps, "repeats": repeats}, json_path)
    if late(args.deadline):
        return
    run_dir = root / "recipe"
    run_dir.mkdir()
    cfg = fo.compose_config(str(run_dir), [*fo.device_overrides(args.device), "stage=ldm", "data.train.length=4096", "data.val.length=64"])
    module = fo.build_module(copy.deepcopy(cfg))
    recipe = fo.Case("shapes recipe", [], int(cfg.data.batch_size), 2 * steps, case.warmup)
    times, _ = fo.framework_run(cfg, module, None, recipe, run_dir)
    report(results, "shapes/recipe", {"steps_per_s": recipe.steps / times.wall, "batch": recipe.batch_size, "steps": recipe.steps,
                                      "precision": str(cfg.trainer.precision)}, json_path)


# ----------------------------------------------------------------------------------------- FSDP


def train_py(overrides: list[str], log: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed ({done.returncode}); its output: {log}\n{(done.stdout + done.stderr)[-3000:]}")
    return done


def run_fsdp(args: argparse.Namespace, results: dict[str, Any], json_path: Path | None) -> None:
    """Stage 1 (a few steps, for the autoencoder), then stage 2 under trainer=fsdp, then the same command to
    twice the steps: a resume through the full-state-dict checkpoint."""
    from ldm.checkpoints import read_checkpoint

    gpu = args.device.startswith("cuda")
    root = Path(tempfile.mkdtemp(prefix="sd_gpu_fsdp_"))
    steps = 4 if args.tiny else 20
    common = ["image_size=32", "data.train.length=512", "data.val.length=64", "logger=csv", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1"]
    start = time.perf_counter()
    train_py(["stage=autoencoder", "trainer=gpu" if gpu else "trainer=cpu", "trainer.devices=1", f"trainer.max_steps={steps}",
              f"trainer.val_check_interval={steps}", "loss/perceptual=none", f"run_dir={root / 'ae'}", *common], root / "ae.log")
    stage2 = ["stage=ldm", "trainer=fsdp" if gpu else "trainer=cpu", "trainer.devices=1", f"trainer.val_check_interval={steps}",
              "stage.module.sample_steps=4", "stage.module.scale_factor_batches=2", f"autoencoder_ckpt={root / 'ae' / 'checkpoints' / 'last.ckpt'}",
              f"run_dir={root / 'ldm'}", *common]
    first_start = time.perf_counter()
    train_py([*stage2, f"trainer.max_steps={steps}"], root / "ldm_first.log")
    second_start = time.perf_counter()
    second = train_py([*stage2, f"trainer.max_steps={2 * steps}"], root / "ldm_resumed.log")
    end = time.perf_counter()
    path = root / "ldm" / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(path)
    keys = list(ckpt["state_dict"])
    model = load_model(str(path), "cpu")
    report(results, "fsdp", {
        "trainer": "fsdp" if gpu else "cpu (Lightning runs FSDP on GPUs only)", "steps": steps,
        "resumed": "Resuming from" in second.stdout + second.stderr, "global_step": int(ckpt["global_step"]),
        "full_state_dict": all("flat_param" not in k and "_fsdp_wrapped_module" not in k for k in keys) and any(k.startswith("unet.") for k in keys),
        "loads_without_fsdp": sum(p.numel() for p in model.unet.parameters()) > 0,
        "stage1_s": first_start - start, "first_s": second_start - first_start, "resumed_s": end - second_start}, json_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "sample", "shapes", "fsdp", "all"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="narrow models and small images: checks the script, not the GPU")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="training image sizes")
    parser.add_argument("--train-batch", type=int, nargs="+", default=[64, 16], help="a batch per training size")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=256, help="the largest batch tried at the largest training size")
    parser.add_argument("--shapes-steps", type=int, default=100, help="timed steps of the shapes recipe")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=512, help="sampling image size")
    parser.add_argument("--sample-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed sampling runs")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no new part starts")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if len(args.train_batch) != len(args.sizes):
        parser.error("--train-batch needs one batch per --sizes entry")

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                               "torch": torch.__version__}
    print(results, flush=True)
    parts = {"shapes": run_shapes, "sample": run_sampling, "fsdp": run_fsdp, "train": run_training}
    for name, part in parts.items():
        if args.what not in (name, "all"):
            continue
        if late(args.deadline):
            print(f"deadline passed: {name} skipped", flush=True)
            continue
        part(args, results, args.json)


if __name__ == "__main__":
    main()
