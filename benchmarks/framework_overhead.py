"""What the framework costs per training step: our LightningModules under the Lightning Trainer against a
plain PyTorch loop doing the same arithmetic on the same network, batch and optimizer.

(b), the framework, is built as `python train.py` builds it: the real Hydra configs (`configs/train.yaml`
with its defaults: TensorBoard logger, the default callbacks, progress bar, LR monitor, EMA, last.ckpt
cadence, NaN guard, per-batch seeding), `ldm.training.run.build_trainer` and the stage's module. (a), the
plain loop, is the ~20 lines a researcher would write: noise, timestep, forward, MSE, backward, AdamW step,
LR schedule, EMA update (stage 2); forward, the same `AutoencoderLoss`, backward, Adam step (stage 1).

Both read the same pre-made batches through a DataLoader (stage 2: cached-latent batches, so the frozen
encoders are not in either step; stage 1: images). Each repetition is a fresh fit (or loop) of
warm-up + N steps, timed from the start of step `warmup` to the start of step `warmup + N`; (a) and (b)
alternate, in swapped order every other repetition, and the medians are compared. A checkpoint (last.ckpt
through the trainer's atomic checkpoint IO, which reads the file back; a plain `torch.save` of the same
weights and optimizer state in the loop) is timed apart after each repetition and added amortised over
the default cadence (`checkpoint_every_n_steps`, 200 steps).

    python benchmarks/framework_overhead.py                        # tiny UNet, ~54M UNet, stage 1; 1 thread
    python benchmarks/framework_overhead.py --cases tiny --repeats 9 --profile
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import logging
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hydra
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from ldm.training.lr_schedules import warmup_cosine
from ldm.training.run import _instantiate, build_trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MID_UNET = ["model.model_channels=96", "model.channel_mult=[1,2,4]", "model.attention_resolutions=[2,4]"]


@dataclass
class Case:
    """One comparison: the config overrides of (b) and the batch both loops see."""

    name: str
    overrides: list[str]
    batch_size: int
    steps: int
    warmup: int
    fw_times: list[Times] = field(default_factory=list)
    plain_times: list[Times] = field(default_factory=list)
    fw_ckpt: list[float] = field(default_factory=list)
    plain_ckpt: list[float] = field(default_factory=list)


class Batches(Dataset):
    """`length` pre-made batches (cycling over a few), read through a DataLoader by both loops."""

    def __init__(self, batches: list[dict[str, Any]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batches[i % len(self.batches)]


class FixedData(pl.LightningDataModule):
    def __init__(self, batches: list[dict[str, Any]], length: int) -> None:
        super().__init__()
        self.dataset = Batches(batches, length)

    def train_dataloader(self) -> DataLoader:
        return loader(self.dataset)


def loader(dataset: Dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0)


class Window(pl.Callback):
    """Wall time from the start of batch `first` to the start of batch `first + n` (first in the callback
    list, so the window holds n whole iterations: hooks, logging, data); optionally profiled."""

    def __init__(self, first: int, n: int, profile: cProfile.Profile | None = None) -> None:
        self.first, self.n, self.profile = first, n, profile
        self.clock = Clock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.first:
            if self.profile is not None:
                self.profile.enable()
            synchronize(pl_module.device)
            self.clock.start()
        elif batch_idx == self.first + self.n:
            synchronize(pl_module.device)
            self.clock.stop()
            if self.profile is not None:
                self.profile.disable()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


class Clock:
    """Wall and process CPU seconds. With one thread, CPU time is what the step itself costs: other
    processes on a shared machine stretch the wall time but not it."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> Times:
        self.times = Times(time.perf_counter() - self.wall, time.process_time() - self.cpu)
        return self.times


@dataclass
class Times:
    wall: float
    cpu: float


def compose_config(run_dir: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=[f"run_dir={run_dir}", *overrides])


def build_module(cfg: DictConfig) -> pl.LightningModule:
    """As `ldm.training.run` builds it; stage 2 gets a randomly initialised tiny autoencoder (its frozen
    encoder is not used on cached latents) and a fixed scale factor."""
    if cfg.stage.name == "ldm":
        with open_dict(cfg):
            cfg.stage.module.autoencoder = OmegaConf.load(CONFIGS / "model" / "autoencoder_tiny.yaml")
            cfg.stage.module.autoencoder_ckpt = None
            cfg.stage.module.scale_factor = 1.0
    return _instantiate(cfg.stage.module, "stage.module", max_nonfinite_steps=cfg.max_nonfinite_steps)


def text_conditioning(module: pl.LightningModule) -> tuple[Callable[[list[str]], Tensor], Tensor, float]:
    """(encode captions, the unconditional context, the caption drop rate) of a text-conditioned stage-2
    module: through its conditioner where it has one (`conditioning=text`), else its own text encoder."""
    conditioner = getattr(module, "conditioner", None)
    if conditioner is not None:
        device = module.device
        return (lambda captions: conditioner.encode_text(captions, device), conditioner.unconditional_context(device),
                float(conditioner.drop_rate))
    return module.encode_text, module.unconditional_context(), float(module.hparams.caption_dropout)


def make_batches(module: pl.LightningModule, cfg: DictConfig, batch_size: int, count: int = 4) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    size = int(cfg.image_size)
    if cfg.stage.name == "autoencoder":
        return [{"image": torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1} for _ in range(count)]
    side = size // module.autoencoder.downsample_factor
    channels = module.unet.in_channels if hasattr(module.unet, "in_channels") else 4
    captions = [f"a large red circle {k}" for k in range(batch_size)]
    context = text_conditioning(module)[0](captions)
    return [
        {"latent_mean": torch.randn(batch_size, channels, side, side, generator=generator),
         "latent_std": torch.rand(batch_size, channels, side, side, generator=generator) * 0.1,
         "context": context, "caption": captions}
        for _ in range(count)
    ]


# --- (b) the framework -----------------------------------------------------------------------------------


def framework_run(cfg: DictConfig, module: pl.LightningModule, batches: list | None, case: Case, run_dir: Path,
                  profile: cProfile.Profile | None = None) -> tuple[Times, float]:
    """One fit of warm-up + N (+ 1) steps through the real trainer; (window times, checkpoint seconds).
    `batches=None` reads the configured dataset (`cfg.data`) instead, as `train.py` does."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.trainer.max_steps = case.warmup + case.steps + 1
    trainer = build_trainer(cfg, run_dir)
    window = Window(case.warmup, case.steps, profile)
    trainer.callbacks.insert(0, window)
    sink = open(os.devnull, "w")
    with redirect_stderr(sink), redirect_stdout(sink):
        data = FixedData(batches, case.warmup + case.steps + 1) if batches is not None else _instantiate(cfg.data, "data")
        trainer.fit(module, datamodule=data)
    start = time.perf_counter()
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return window.clock.times, time.perf_counter() - start


# --- (a) the plain loop ----------------------------------------------------------------------------------


def timed_window(data: DataLoader, first: int, n: int, device: torch.device, step: Callable[[dict], None]) -> Times:
    """Runs `step` on each batch of `data` and times batches first .. first + n - 1 (the ones before warm up)."""
    clock = Clock()
    for i, batch in enumerate(data):
        if i == first:
            synchronize(device)
            clock.start()
        elif i == first + n:
            synchronize(device)
            return clock.stop()
        step(batch)
    raise RuntimeError("the loader ended before the window did")


class PlainLDM:
    """Stage 2 in plain PyTorch: the module's UNet (a copy), AdamW, warm-up LR, EMA, v-prediction MSE."""

    def __init__(self, module: pl.LightningModule, device: torch.device, bf16: bool) -> None:
        h = module.hparams
        self.device, self.bf16 = device, bf16
        self.unet = copy.deepcopy(module.unet).train().to(device)
        self.ema = copy.deepcopy(module.unet).eval().requires_grad_(False).to(device)
        self.params, self.ema_params = list(self.unet.parameters()), list(self.ema.parameters())
        self.optimizer = hydra.utils.instantiate(h.optimizer)(self.params)
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(h.lr_warmup_steps, h.lr_decay_steps, h.lr_min_ratio, h.lr_decay_start))
        self.alphas_cumprod = module.schedule.alphas_cumprod.to(device)
        _, uncond, self.dropout = text_conditioning(module)
        self.uncond = uncond.to(device)
        self.scale, self.decay = float(module.scale_factor), h.ema_decay

    def run(self, data: DataLoader, first: int, n: int) -> Times:
        return timed_window(data, first, n, self.device, self.step_on)

    def step_on(self, batch: dict) -> None:
        batch = on_device(batch, self.device)
        mean, std, context = batch["latent_mean"], batch["latent_std"], batch["context"]
        z0 = self.scale * (mean + std * torch.randn_like(mean))
        drop = (torch.rand(z0.shape[0]) < self.dropout).view(-1, 1, 1).to(self.device)
        context = torch.where(drop, self.uncond, context)
        t = torch.randint(0, len(self.alphas_cumprod), (z0.shape[0],)).to(self.device)
        noise = torch.randn_like(z0)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * z0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            prediction = self.unet(z_t, t, context)
        loss = F.mse_loss(prediction.float(), v)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - self.decay)

    def state(self) -> dict[str, Any]:
        return {"unet": self.unet.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict()}


class PlainAutoencoder:
    """Stage 1 in plain PyTorch: the module's autoencoder and loss (copies), Adam, warm-up/cosine LR."""

    def __init__(self, module: pl.LightningModule, device: torch.device, bf16: bool) -> None:
        h = module.hparams
        self.device, self.bf16 = device, bf16
        self.autoencoder = copy.deepcopy(module.autoencoder).train().to(device)
        self.loss = copy.deepcopy(module.loss).to(device)
        self.optimizer = hydra.utils.instantiate(h.optimizer)(self.autoencoder.parameters())
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(h.lr_warmup_steps, h.lr_decay_steps, h.lr_min_ratio))
        self.step = 0

    def run(self, data: DataLoader, first: int, n: int) -> Times:
        return timed_window(data, first, n, self.device, self.step_on)

    def step_on(self, batch: dict) -> None:
        x = batch["image"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            reconstructions, posterior = self.autoencoder(x)
            loss, _ = self.loss.generator_loss(x, reconstructions, posterior, self.step, self.autoencoder.last_layer)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1

    def state(self) -> dict[str, Any]:
        return {"autoencoder": self.autoencoder.state_dict(), "loss": self.loss.state_dict(), "optimizer": self.optimizer.state_dict()}


def plain_run(plain: PlainLDM | PlainAutoencoder, batches: list, case: Case, run_dir: Path,
              profile: cProfile.Profile | None = None) -> tuple[Times, float]:
    data = loader(Batches(batches, case.warmup + case.steps + 1))
    if profile is not None:
        profile.enable()
    seconds = plain.run(data, case.warmup, case.steps)
    if profile is not None:
        profile.disable()
    start = time.perf_counter()
    path = run_dir / "plain.ckpt"
    torch.save(plain.state(), path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return seconds, time.perf_counter() - start


# --- profile summary -------------------------------------------------------------------------------------


def by_package(profile: cProfile.Profile, steps: int) -> dict[str, float]:
    """Own time (ms per step) by where the Python code lives: torch's ops and C calls, Lightning, ldm, ..."""
    totals: dict[str, float] = defaultdict(float)
    for (filename, _, name), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
        if filename == "~":
            key = "torch ops (C)" if "torch" in name or "Tensor" in name or "_C." in name else "other builtins"
        elif any(f"/{name}/" in filename for name in ("lightning", "lightning_fabric", "lightning_utilities", "torchmetrics")):
            key = "lightning"
        elif "/tensorboard" in filename or "/tqdm/" in filename:
            key = "logger, progress bar"
        elif "/python3." in filename and "site-packages" not in filename:
            key = "Python stdlib"
        elif "/ldm/" in filename:
            key = "ldm"
        elif "/benchmarks/" in filename:
            key = "benchmark loop"
        elif "/torch/" in filename:
            key = "torch (Python)"
        else:
            key = Path(filename).parts[-2] if len(Path(filename).parts) > 1 else filename
        totals[key] += 1e3 * own / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def print_profile(name: str, fw: cProfile.Profile, plain: cProfile.Profile, steps: int, top: int) -> None:
    fw_pkg, plain_pkg = by_package(fw, steps), by_package(plain, steps)
    print(f"\n[{name}] own CPU time per step by package, ms (cProfile over {steps} steps; profiling inflates Python)")
    print(f"{'':>22} {'framework':>10} {'plain':>10}")
    for key in dict.fromkeys([*fw_pkg, *plain_pkg]):
        if fw_pkg.get(key, 0) + plain_pkg.get(key, 0) >= 0.05:
            print(f"{key:>22} {fw_pkg.get(key, 0.0):10.2f} {plain_pkg.get(key, 0.0):10.2f}")
    out = io.StringIO()
    stats = pstats.Stats(fw, stream=out)
    stats.sort_stats("tottime").print_stats(r"lightning|/ldm/|torch/(optim|nn/modules/module|utils)", top)
    print(f"\n[{name}] framework: top {top} Python functions (outside torch's ops) by own time, {steps} steps")
    print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


# --- main ------------------------------------------------------------------------------------------------


def cases(args: argparse.Namespace) -> dict[str, Case]:
    return {
        "tiny": Case("stage 2, unet_tiny", ["stage=ldm"], 32, args.steps or 20, args.warmup),
        "mid": Case("stage 2, mid UNet", ["stage=ldm", *MID_UNET], 8, args.steps or 5, args.warmup),
        "ae": Case("stage 1, autoencoder_tiny", ["stage=autoencoder"], 32, args.steps or 10, args.warmup),
    }


def device_overrides(device: str) -> list[str]:
    """`trainer=gpu` (bf16-mixed) on a GPU, as the GPU recipes run; the CPU defaults otherwise."""
    return ["trainer=gpu", f"trainer.devices=[{torch.device(device).index or 0}]"] if device.startswith("cuda") else []


def run_case(case: Case, args: argparse.Namespace, root: Path) -> None:
    run_dir = root / case.name.replace(" ", "_").replace(",", "")
    run_dir.mkdir(parents=True)
    cfg = compose_config(str(run_dir), device_overrides(args.device) + case.overrides + args.override)
    torch.manual_seed(0)
    module = build_module(copy.deepcopy(cfg))
    batches = make_batches(module, cfg, case.batch_size)
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    plain = (PlainLDM if cfg.stage.name == "ldm" else PlainAutoencoder)(module, torch.device(args.device), bf16)
    params = sum(p.numel() for p in (module.unet if cfg.stage.name == "ldm" else module.autoencoder).parameters()) / 1e6
    print(f"\n{case.name}: {params:.2f}M trained parameters, batch {case.batch_size}, "
          f"{case.steps} timed steps after {case.warmup}, {args.repeats} repetitions", flush=True)
    runs: list[tuple[str, Callable[[], tuple[Times, float]]]] = [
        ("framework", lambda: framework_run(cfg, module, batches, case, run_dir)),
        ("plain", lambda: plain_run(plain, batches, case, run_dir)),
    ]
    for rep in range(args.repeats):
        for label, run in (runs if rep % 2 == 0 else runs[::-1]):
            times, ckpt = run()
            per_step = Times(times.wall / case.steps, times.cpu / case.steps)
            (case.fw_times if label == "framework" else case.plain_times).append(per_step)
            (case.fw_ckpt if label == "framework" else case.plain_ckpt).append(ckpt)
        fw_t, plain_t = case.fw_times[-1], case.plain_times[-1]
        print(f"  rep {rep}: framework {1e3 * fw_t.cpu:8.2f} ms CPU ({1e3 * fw_t.wall:8.2f} wall) per step   "
              f"plain {1e3 * plain_t.cpu:8.2f} ms CPU ({1e3 * plain_t.wall:8.2f} wall)", flush=True)
    if args.profile:
        fw_profile, plain_profile = cProfile.Profile(time.process_time), cProfile.Profile(time.process_time)
        framework_run(cfg, module, batches, case, run_dir, fw_profile)
        plain_run(plain, batches, case, run_dir, plain_profile)
        print_profile(case.name, fw_profile, plain_profile, case.steps, args.top)


def report(results: list[Case], every: int) -> None:
    print(f"\nper step, medians over the repetitions; the checkpoint (wall seconds) amortised over {every} steps "
          "(the default checkpoint_every_n_steps)")
    print(f"{'case':>26} | {'CPU ms fw / plain':>19} {'ratio':>6} | {'wall ms fw / plain':>19} {'ratio':>6} | "
          f"{'ckpt s fw / plain':>17} | {'CPU ratio w/ ckpt':>17}")
    for case in results:
        fw_cpu, plain_cpu = statistics.median(t.cpu for t in case.fw_times), statistics.median(t.cpu for t in case.plain_times)
        fw_wall, plain_wall = statistics.median(t.wall for t in case.fw_times), statistics.median(t.wall for t in case.plain_times)
        fw_c, plain_c = statistics.median(case.fw_ckpt), statistics.median(case.plain_ckpt)
        amortised = (fw_cpu + fw_c / every) / (plain_cpu + plain_c / every)
        print(f"{case.name:>26} | {1e3 * fw_cpu:8.2f} / {1e3 * plain_cpu:8.2f} {fw_cpu / plain_cpu:6.3f} | "
              f"{1e3 * fw_wall:8.2f} / {1e3 * plain_wall:8.2f} {fw_wall / plain_wall:6.3f} | "
              f"{fw_c:7.2f} / {plain_c:7.2f} | {amortised:17.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["tiny", "mid", "ae"], choices=["tiny", "mid", "ae"])
    parser.add_argument("--repeats", type=int, default=5, help="(a)/(b) pairs, alternating; medians reported")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repetition (default per case)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: trainer=gpu (bf16-mixed) and the plain loop in bf16 autocast")
    parser.add_argument("--profile", action="store_true", help="cProfile one more window of each and print where the time goes")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every case, e.g. trainer.log_every_n_steps=50")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "ldm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs; {' '.join(sys.argv[1:]) or 'defaults'}")
    root = Path(tempfile.mkdtemp(prefix="framework_overhead_", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    every = int(compose_config(str(root), []).checkpoint_every_n_steps or 0) or 200
    results = []
    for name in args.cases:
        case = cases(args)[name]
        run_case(case, args, root)
        results.append(case)
    report(results, every)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
