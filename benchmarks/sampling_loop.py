"""Times our DDIM loop with classifier-free guidance against diffusers' DDIMScheduler loop.

Both loops call the SAME UNet (ours, built from a config at random init) with the same batched
CFG (one forward over [uncond, cond]), from the same noise, so the model cost is identical and the
difference is the loops' own overhead. A second pass replaces the UNet with a nearly free
denoiser to show that overhead alone. The two loops' results are compared as a check that they
compute the same thing.

The runs alternate (ours, diffusers; then diffusers, ours) and medians are reported, of wall time and
of process CPU time: with one thread the CPU time is what the loop itself costs, which other processes
on a shared machine do not stretch.

    python benchmarks/sampling_loop.py                       # unet_tiny, 4x32x32 latents, 50 steps
    python benchmarks/sampling_loop.py --latent 64 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import hydra
import torch
from diffusers import DDIMScheduler
from omegaconf import OmegaConf
from torch import Tensor, nn

from ldm.diffusion import DDIMSampler, NoiseSchedule
from ldm.inference import denoise_latents

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BETA_START, BETA_END = 0.00085, 0.012


def ours(unet: nn.Module, x_T: Tensor, context: Tensor, uncond: Tensor, scale: float, steps: int) -> Tensor:
    schedule = NoiseSchedule(kind="scaled_linear", beta_start=BETA_START, beta_end=BETA_END)
    sampler = DDIMSampler(schedule, steps, eta=0.0, spacing="leading")
    return denoise_latents(unet, sampler, context, uncond, scale, x_T, prediction="eps")


def diffusers_loop(unet: nn.Module, x_T: Tensor, context: Tensor, uncond: Tensor, scale: float, steps: int) -> Tensor:
    """The loop of diffusers' StableDiffusionPipeline, without the pipeline around it."""
    scheduler = DDIMScheduler(
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    both = torch.cat([uncond, context])
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = unet(x_in, t.expand(x_in.shape[0]).to(x.dtype), both)
        out_uncond, out_cond = out.chunk(2)
        x = scheduler.step(out_uncond + scale * (out_cond - out_uncond), t, x).prev_sample
    return x


class NearlyFree(nn.Module):
    """A denoiser that costs almost nothing, so only the loop is timed."""

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return 0.1 * x


def interleaved(loops: dict[str, Callable[[], Tensor]], repeats: int) -> dict[str, tuple[float, float, Tensor]]:
    """(median wall s, median CPU s, last output) of each loop, run in alternating order."""
    names = list(loops)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    out: dict[str, Tensor] = {}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            out[name] = loops[name]()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name]), out[name]) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", default="unet_tiny", help="a config in configs/model/ (random init)")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=1, help="images per run (the UNet sees twice as many)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=7, help="runs of each loop, alternating; medians reported")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = OmegaConf.load(CONFIGS / "model" / f"{args.unet}.yaml")
    unet = hydra.utils.instantiate(cfg).eval()
    x_T = torch.randn(args.batch, cfg.in_channels, args.latent, args.latent)
    context = torch.randn(args.batch, 77, cfg.context_dim)
    uncond = torch.randn(args.batch, 77, cfg.context_dim)
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"{args.unet} ({n_params:.1f}M parameters), latents {args.batch}x{cfg.in_channels}x{args.latent}x{args.latent}, "
          f"DDIM {args.steps} steps, CFG {args.guidance} (UNet batch {2 * args.batch}), {args.threads} thread(s), "
          f"medians of {args.repeats} alternating runs")

    with torch.inference_mode():
        for label, model in ((args.unet, unet), ("nearly free denoiser", NearlyFree())):
            times = interleaved({
                "ours": lambda: ours(model, x_T, context, uncond, args.guidance, args.steps),
                "diffusers": lambda: diffusers_loop(model, x_T, context, uncond, args.guidance, args.steps),
            }, args.repeats)
            (ours_wall, ours_cpu, ours_x), (theirs_wall, theirs_cpu, theirs_x) = times["ours"], times["diffusers"]
            diff = (ours_x - theirs_x).abs().max().item()
            print(f"{label:>22}: CPU ours {ours_cpu:7.3f} s ({1e3 * ours_cpu / args.steps:7.3f} ms/step), "
                  f"diffusers {theirs_cpu:7.3f} s ({1e3 * theirs_cpu / args.steps:7.3f} ms/step), ratio {ours_cpu / theirs_cpu:5.3f}; "
                  f"wall ours {ours_wall:7.3f} s, diffusers {theirs_wall:7.3f} s, ratio {ours_wall / theirs_wall:5.3f}; "
                  f"max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
