"""Stage 2 (LatentDiffusionModule) through the real configs: conditioning, latent scale factor, EMA,
precision, resume, reloading in a fresh process, and the errors a user meets first."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from ldm.checkpoints import CheckpointStageError
from ldm.diffusion.samplers import DDIMSampler
from ldm.inference import generate_images
from ldm.modules.latent_codec import LatentCodec
from ldm.training.ldm_module import LatentDiffusionModule
from ldm.training.run import ConfigError, build_trainer, train
from train_helpers import TINY_LDM, compose_config

PROMPT = "a red circle"


def _ldm_config(run_dir: Path, autoencoder_ckpt: str, *overrides: str):
    return compose_config(str(run_dir), [*TINY_LDM, f"autoencoder_ckpt={autoencoder_ckpt}", *overrides])


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def _checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _first(module: nn.Module, kind: type[nn.Module]) -> nn.Module:
    return next(m for m in module.modules() if isinstance(m, kind))


class ContextRecorder(nn.Module):
    """Stands in for the UNet: predicts zeros and keeps every context it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        self.contexts.append(context.detach().clone())
        return torch.zeros_like(x)


class IdentityPosterior:
    def __init__(self, z: Tensor) -> None:
        self.z = z

    def sample(self) -> Tensor:
        return self.z


class LatentsAreInputs(nn.Module):
    """Stands in for the autoencoder: its latents are its inputs, so their statistics are known."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # LatentCodec reads its device from a parameter

    def encode(self, x: Tensor) -> IdentityPosterior:
        return IdentityPosterior(x)


class VOracle(nn.Module):
    """Stands in for a perfect v-prediction UNet whose every sample is the latent `clean`."""

    def __init__(self, clean: Tensor, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.clean, self.alphas_cumprod = clean, alphas_cumprod

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        alpha_bar = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        eps = (x_t - alpha_bar.sqrt() * self.clean) / (1 - alpha_bar).sqrt()
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * self.clean


@pytest.fixture(scope="module")
def module_config(tiny_autoencoder_ckpt, tmp_path_factory):
    return _ldm_config(tmp_path_factory.mktemp("ldm_module"), tiny_autoencoder_ckpt, "stage.module.scale_factor=0.18215")


@pytest.fixture
def module(module_config) -> LatentDiffusionModule:
    """The tiny stage-2 module, untrained, with the scale factor fixed in the config (as for the SD VAE).
    Built afresh for each test (~0.15 s), because tests monkeypatch its parts: monkeypatch cannot restore a
    submodule or buffer of a shared nn.Module (pytest >= 9.2 deletes it at teardown: it is not in the
    instance __dict__), and a module-scoped one would carry one test's patches into the next."""
    return hydra.utils.instantiate(module_config.stage.module)


# --- errors a user meets first ------------------------------------------------------------------


def test_missing_autoencoder_ckpt_says_to_train_stage_autoencoder_first(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"autoencoder_ckpt=.*`python train.py stage=autoencoder`"):
        train(compose_config(str(tmp_path), TINY_LDM))
    with pytest.raises(ConfigError, match=r"does not exist\. Train one first with `python train.py stage=autoencoder`"):
        train(compose_config(str(tmp_path), [*TINY_LDM, f"autoencoder_ckpt={tmp_path / 'nowhere.ckpt'}"]))


def test_a_stage2_checkpoint_as_autoencoder_ckpt_fails_clearly(tmp_path: Path, tiny_ldm_ckpt: str) -> None:
    with pytest.raises(ConfigError, match=r"is a 'ldm' checkpoint, not a stage-1 \(autoencoder\) one.*stage-1"):
        train(_ldm_config(tmp_path, tiny_ldm_ckpt))


def test_unet_context_dim_must_match_the_text_encoder_width(tmp_path: Path, tiny_autoencoder_ckpt: str) -> None:
    with pytest.raises(ConfigError, match=r"context_dim \(32\) differs from the text encoder's width \(64\).*model.context_dim=64"):
        train(_ldm_config(tmp_path, tiny_autoencoder_ckpt, "model.context_dim=32"))


def test_eps_prediction_on_a_zero_terminal_snr_schedule_fails_before_training(tmp_path: Path, tiny_autoencoder_ckpt: str) -> None:
    with pytest.raises(ConfigError, match=r"prediction=eps cannot be sampled from a zero-terminal-SNR schedule.*prediction=v"):
        train(_ldm_config(tmp_path, tiny_autoencoder_ckpt, "stage.module.prediction=eps"))


def test_from_checkpoint_refuses_a_stage1_checkpoint(tiny_autoencoder_ckpt: str) -> None:
    with pytest.raises(CheckpointStageError, match="'autoencoder' checkpoint, not a stage-2"):
        LatentDiffusionModule.from_checkpoint(tiny_autoencoder_ckpt)


# --- frozen parts ------------------------------------------------------------------------------


def test_autoencoder_and_text_encoder_are_frozen_in_eval_mode_and_out_of_the_optimizer(module: LatentDiffusionModule) -> None:
    module.train()
    for frozen in (module.autoencoder, module.conditioner.text_encoder):
        assert not frozen.training and not any(m.training for m in frozen.modules())
        assert not any(p.requires_grad for p in frozen.parameters())
    assert module.unet.training
    optimizer = module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.unet.parameters()}


# --- latent scale factor ---------------------------------------------------------------------


def test_measured_scale_factor_is_one_over_the_latent_std(module: LatentDiffusionModule, monkeypatch) -> None:
    monkeypatch.setattr(module, "autoencoder", LatentsAreInputs())
    g = torch.Generator().manual_seed(1)
    batches = [{"image": 2.5 * torch.randn(4, 4, 8, 8, generator=g) + 0.7} for _ in range(5)]
    latents = torch.cat([b["image"] for b in batches]).double()
    measured = module.measure_scale_factor(batches)
    assert measured == pytest.approx(1.0 / latents.std(unbiased=False).item(), rel=1e-9)
    assert measured == pytest.approx(1 / 2.5, rel=0.02)


def test_scale_factor_statistics_are_summed_over_ranks_before_the_std(module: LatentDiffusionModule, monkeypatch) -> None:
    """Two ranks with different latent scales: the factor is 1/std of their union, not an average of factors."""
    monkeypatch.setattr(module, "autoencoder", LatentsAreInputs())
    g = torch.Generator().manual_seed(2)
    rank0 = [{"image": 1.0 * torch.randn(4, 4, 8, 8, generator=g)} for _ in range(3)]
    rank1 = [{"image": 3.0 * torch.randn(4, 4, 8, 8, generator=g) + 1.0} for _ in range(3)]
    sent: list[Tensor] = []

    def reduce_as_rank1(stats: Tensor, reduce_op: str) -> Tensor:
        assert reduce_op == "sum"
        sent.append(stats.clone())
        return stats

    monkeypatch.setattr(module, "_trainer", SimpleNamespace(strategy=SimpleNamespace(reduce=reduce_as_rank1)))
    module.measure_scale_factor(rank1)
    rank1_stats = sent.pop()
    monkeypatch.setattr(module, "_trainer", SimpleNamespace(strategy=SimpleNamespace(reduce=lambda stats, reduce_op: stats + rank1_stats)))
    measured = module.measure_scale_factor(rank0)
    union = torch.cat([b["image"] for b in rank0 + rank1]).double()
    assert measured == pytest.approx(1.0 / union.std(unbiased=False).item(), rel=1e-9)


def test_a_scale_factor_fixed_in_the_config_is_never_measured(module: LatentDiffusionModule, monkeypatch) -> None:
    monkeypatch.setattr(LatentDiffusionModule, "measure_scale_factor", lambda *a, **k: pytest.fail("re-measured"))
    module.on_train_start()
    assert float(module.scale_factor) == 0.18215


def test_validation_before_the_scale_factor_is_measured_is_skipped(module: LatentDiffusionModule, monkeypatch) -> None:
    """A sanity check runs before on_train_start: with a factor of 0 every latent would be 0."""
    monkeypatch.setattr(module, "scale_factor", torch.zeros((), dtype=torch.float64))
    recorder = ContextRecorder()
    monkeypatch.setattr(module.ema, "module", recorder)
    module.validation_step({"image": torch.zeros(2, 3, 32, 32), "caption": ["a", "b"]}, 0)
    assert recorder.contexts == []


# --- conditioning ----------------------------------------------------------------------------


def test_caption_dropout_rate(module: LatentDiffusionModule, monkeypatch) -> None:
    text = module.conditioner
    assert text.drop_rate == 0.1
    captions = [f"caption {i}" for i in range(10_000)]
    dropped = text.drop_captions(captions, generator=torch.Generator().manual_seed(3))
    assert all(d in ("", c) for d, c in zip(dropped, captions))
    assert dropped.count("") / len(captions) == pytest.approx(0.1, abs=0.01)
    monkeypatch.setattr(text, "drop_rate", 0.0)
    assert text.drop_captions(captions[:100]) == captions[:100]
    monkeypatch.setattr(text, "drop_rate", 1.0)
    assert text.drop_captions(captions[:100]) == [""] * 100


def test_a_dropped_caption_conditions_the_unet_as_sampling_does_unconditionally(module: LatentDiffusionModule, monkeypatch) -> None:
    monkeypatch.setattr(module.conditioner, "drop_rate", 1.0)
    training_unet, sampling_unet = ContextRecorder(), ContextRecorder()
    monkeypatch.setattr(module, "unet", training_unet)
    monkeypatch.setattr(module.ema, "module", sampling_unet)
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "caption": [PROMPT, "a blue square"]}
    module.training_step(batch, 0)
    dropped = training_unet.contexts[0]
    assert torch.equal(dropped[0], dropped[1])

    generate_images(module.generation_model(), DDIMSampler(module.schedule, 1), [PROMPT], [0], height=32, width=32, guidance_scale=5.0)
    (guided_batch,) = sampling_unet.contexts
    cond = module.conditioner.encode_text([PROMPT], module.device)[0]
    uncond_rows = [row for row in guided_batch if not torch.equal(row, cond)]
    assert len(uncond_rows) == 1 and len(guided_batch) == 2
    # Bitwise equality is not promised across batch sizes (matmul kernels); distinct prompts differ by O(1).
    torch.testing.assert_close(uncond_rows[0], dropped[0], rtol=1e-5, atol=1e-5)
    assert (cond - dropped[0]).abs().max() > 0.1


# --- objective -------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_loss_is_zero_exactly_for_the_closed_form_target(module: LatentDiffusionModule, monkeypatch, prediction: str) -> None:
    monkeypatch.setitem(module.hparams, "prediction", prediction)
    g = torch.Generator().manual_seed(4)
    z0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    alpha_bar = torch.cumprod(1 - module.schedule.betas_f64, 0)[t].float().view(-1, 1, 1, 1)
    closed_form = {"eps": noise, "v": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * z0}
    context = torch.zeros(6, 77, 64)

    def predicts(target: Tensor):
        return lambda z_t, t_, c: target

    _, exact = module.diffusion_loss(z0, context, t, noise, unet=predicts(closed_form[prediction]))
    other = "v" if prediction == "eps" else "eps"
    per_sample, wrong = module.diffusion_loss(z0, context, t, noise, unet=predicts(closed_form[other]))
    assert exact.item() == pytest.approx(0.0, abs=1e-10)
    assert wrong.item() > 0.05
    expected = (closed_form[other] - closed_form[prediction]).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample, expected)


def test_validation_grids_of_a_v_model_are_sampled_as_v(module: LatentDiffusionModule, monkeypatch) -> None:
    """An oracle that knows the clean latent answers in v; deterministic DDIM then lands on that latent
    only if the sampler reads the output as v."""
    monkeypatch.setitem(module.hparams, "prediction", "v")
    monkeypatch.setitem(module.hparams, "validation_prompts", ["a", "b"])
    latent_size = 32 // module.autoencoder.downsample_factor
    clean = torch.randn(1, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(5))
    decoded: list[Tensor] = []
    monkeypatch.setattr(module.ema, "module", VOracle(clean, module.schedule.alphas_cumprod))
    monkeypatch.setattr(LatentCodec, "decode", lambda codec, z: decoded.append(z) or torch.zeros(z.shape[0], 3, 32, 32))
    grids = module.log_images({"image": torch.zeros(2, 3, 32, 32), "caption": ["x", "y"]})
    assert grids["samples"].shape == (3, 2 * 34 + 2, 2 * 34 + 2)
    for z in decoded:
        torch.testing.assert_close(z, clean.expand_as(z), atol=2e-5, rtol=2e-5)


# --- training runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accumulated_bf16_run(tiny_autoencoder_ckpt, tmp_path_factory) -> SimpleNamespace:
    """3 optimizer steps of 2 accumulated batches each under bf16-mixed, with warm-up over the 3 steps,
    recording the dtypes inside each component and every scale-factor measurement."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("ldm_accumulated_bf16")
    cfg = _ldm_config(run_dir, tiny_autoencoder_ckpt, "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2",
                      "trainer.max_steps=3", "trainer.val_check_interval=1000", "stage.module.lr_warmup_steps=3")
    pl.seed_everything(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    ldm = hydra.utils.instantiate(cfg.stage.module)
    dtypes: dict[str, set[torch.dtype]] = {"autoencoder": set(), "text_encoder": set(), "unet": set()}
    layers = {"autoencoder": _first(ldm.autoencoder, nn.Conv2d), "unet": _first(ldm.unet, nn.Conv2d),
              "text_encoder": ldm.conditioner.text_encoder.text_tower.transformer.resblocks[0].mlp}
    for name, layer in layers.items():
        layer.register_forward_hook(lambda m, i, out, name=name: dtypes[name].add(out.dtype))
    measured_batches: list[int] = []
    measure = ldm.measure_scale_factor

    def counting_measure(batches):
        batches = list(batches)
        measured_batches.append(len(batches))
        return measure(batches)

    ldm.measure_scale_factor = counting_measure
    trainer = build_trainer(cfg, run_dir)
    trainer.fit(ldm, datamodule=datamodule)
    return SimpleNamespace(module=ldm, trainer=trainer, dtypes=dtypes, measured_batches=measured_batches,
                           metrics=_metrics(run_dir), lr=cfg.stage.module.optimizer.lr)


def test_ema_updates_once_per_optimizer_step_under_gradient_accumulation(accumulated_bf16_run) -> None:
    run = accumulated_bf16_run
    assert run.trainer.global_step == 3
    assert run.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6
    (optimizer,) = run.trainer.optimizers
    assert {int(state["step"]) for state in optimizer.state.values()} == {3}
    assert int(run.module.ema.num_updates) == 3
    assert not torch.equal(_first(run.module.ema.module, nn.Conv2d).weight, _first(run.module.unet, nn.Conv2d).weight)


def test_learning_rate_warms_up_over_optimizer_steps(accumulated_bf16_run) -> None:
    lrs = _column(accumulated_bf16_run.metrics, "lr-AdamW")
    lr = accumulated_bf16_run.lr
    assert lrs == pytest.approx([lr / 3, lr / 3, 2 * lr / 3, 2 * lr / 3, lr, lr])  # logged per batch, 2 per step


def test_the_configured_decay_reaches_the_learning_rate_scheduler(tmp_path: Path, tiny_autoencoder_ckpt: str) -> None:
    cfg = _ldm_config(tmp_path, tiny_autoencoder_ckpt, "stage.module.lr_warmup_steps=10", "stage.module.lr_decay_start=100",
                      "stage.module.lr_decay_steps=200", "stage.module.lr_min_ratio=0.1")
    scheduler = hydra.utils.instantiate(cfg.stage.module).configure_optimizers()["lr_scheduler"]["scheduler"]
    (multiplier,) = scheduler.lr_lambdas
    assert [multiplier(step) for step in (0, 50, 99, 150, 200, 300)] == pytest.approx([0.1, 1.0, 1.0, 0.55, 0.1, 0.1])


def test_bf16_mixed_runs_the_unet_in_bf16_and_the_frozen_parts_in_fp32(accumulated_bf16_run) -> None:
    run = accumulated_bf16_run
    assert run.dtypes == {"autoencoder": {torch.float32}, "text_encoder": {torch.float32}, "unet": {torch.bfloat16}}
    assert all(p.dtype == torch.float32 for p in run.module.autoencoder.parameters())
    losses = _column(run.metrics, "train/loss")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)  # logged once per optimizer step


def test_scale_factor_is_measured_once_before_training(accumulated_bf16_run) -> None:
    run = accumulated_bf16_run
    assert run.measured_batches == [2]
    assert 0.0 < float(run.module.scale_factor) < math.inf


# The v target contains x0, and the fixture autoencoder (30 steps) still has posterior noise of the
# order of its latents' spread, which no UNet can predict: v's loss floor is high, so it only has to fall.
@pytest.mark.parametrize(("prediction", "steps", "lr", "factor"), [("eps", 20, 1e-3, 0.8), ("v", 60, 3e-3, 0.98)])
def test_loss_falls_on_a_fixed_batch(tmp_path: Path, tiny_autoencoder_ckpt: str, prediction: str, steps: int, lr: float, factor: float) -> None:
    torch.set_num_threads(1)
    schedule = "scaled_linear" if prediction == "eps" else "scaled_linear_zero_snr"
    cfg = _ldm_config(tmp_path, tiny_autoencoder_ckpt, f"stage.module.prediction={prediction}", f"schedule={schedule}", f"trainer.max_steps={steps}",
                      "trainer.val_check_interval=1000", "data.train.length=320", f"stage.module.optimizer.lr={lr}")
    pl.seed_everything(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    ldm = hydra.utils.instantiate(cfg.stage.module)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    ldm.scale_factor.fill_(ldm.measure_scale_factor([batch]))
    g = torch.Generator().manual_seed(6)
    z0 = ldm.latents_of({"image": batch["image"]})
    context = ldm.conditioner.encode_text(batch["caption"], ldm.device)
    t = torch.randint(0, ldm.schedule.num_timesteps, (z0.shape[0],), generator=g)
    noise = torch.randn(z0.shape, generator=g)

    def fixed_loss() -> float:
        with torch.no_grad():
            return ldm.diffusion_loss(z0, context, t, noise)[1].item()

    before = fixed_loss()
    build_trainer(cfg, tmp_path).fit(ldm, datamodule=datamodule)
    after = fixed_loss()
    assert after < factor * before, (before, after)


def test_validation_logs_grids_and_timestep_buckets(tiny_ldm_ckpt: str) -> None:
    run_dir = Path(tiny_ldm_ckpt).parents[1]
    (grid,) = sorted((run_dir / "images").glob("samples_step*.png"))
    prompts = 6  # configs/stage/ldm.yaml validation_prompts; a row guided, a row unguided
    assert Image.open(grid).size == (prompts * 34 + 2, 2 * 34 + 2)
    rows = _metrics(run_dir)
    buckets = ["loss_t0-249", "loss_t250-499", "loss_t500-749", "loss_t750-999"]
    for bucket in buckets:
        values = _column(rows, f"train/{bucket}")
        assert values and all(v > 0 for v in values), "an empty bucket must not be logged as a loss of 0"
        (val,) = _column(rows, f"val/{bucket}")
        assert math.isfinite(val) and val > 0


# --- checkpoints -----------------------------------------------------------------------------


def test_resume_reuses_the_saved_scale_factor_and_ema(tmp_path: Path, tiny_autoencoder_ckpt: str, tiny_ldm_ckpt: str, monkeypatch) -> None:
    monkeypatch.setattr(LatentDiffusionModule, "measure_scale_factor", lambda *a, **k: pytest.fail("re-measured on resume"))
    train(_ldm_config(tmp_path, tiny_autoencoder_ckpt, "trainer.max_steps=12", "trainer.val_check_interval=12",
                      f"ckpt_path={tiny_ldm_ckpt}"))
    before, after = _checkpoint(tiny_ldm_ckpt), _checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert float(before["state_dict"]["scale_factor"]) > 0
    assert torch.equal(after["state_dict"]["scale_factor"], before["state_dict"]["scale_factor"])
    assert (before["global_step"], after["global_step"]) == (10, 12)
    assert int(after["state_dict"]["ema.num_updates"]) == 12
    assert _column(_metrics(tmp_path), "lr-AdamW")  # trained on, not just reloaded


def test_from_checkpoint_keeps_the_scale_factor_and_moves_the_schedule(tiny_ldm_ckpt: str) -> None:
    saved = _checkpoint(tiny_ldm_ckpt)["state_dict"]["scale_factor"]
    loaded = LatentDiffusionModule.from_checkpoint(tiny_ldm_ckpt)
    assert torch.equal(loaded.scale_factor, saved) and not loaded.training
    loaded.to("meta")
    assert {loaded.schedule.alphas_cumprod.device.type, loaded.schedule.betas.device.type} == {"meta"}


def test_a_fresh_process_conditions_exactly_as_training_did(tmp_path: Path, tiny_ldm_ckpt: str, repo_root: str) -> None:
    out = tmp_path / "embedding.pt"
    script = textwrap.dedent(f"""
        import torch
        from ldm.training.ldm_module import LatentDiffusionModule
        module = LatentDiffusionModule.from_checkpoint({tiny_ldm_ckpt!r})
        torch.save(module.conditioner.encode_text([{PROMPT!r}], module.device), {str(out)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RANDOMLY INITIALISED" not in done.stderr

    ckpt = _checkpoint(tiny_ldm_ckpt)
    as_trained = hydra.utils.instantiate(ckpt["hyper_parameters"]["conditioning"]["encoder"])
    saved = {k.removeprefix("conditioner.text_encoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("conditioner.text_encoder.")}
    for name, tensor in as_trained.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    torch.testing.assert_close(torch.load(out), as_trained([PROMPT]), rtol=1e-5, atol=1e-5)
