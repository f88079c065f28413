"""Stage 2: a UNet trained on the latents of a frozen autoencoder, conditioned by a conditioner (text by default)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.checkpoints import (
    autoencoder_from_checkpoint,
    read_checkpoint,
    require_stage,
    state_dict_sha256,
    sub_state_dict,
)
from ldm.checkpoints.models import TEXT_CONDITIONER, upgrade_stage2_hparams, upgrade_stage2_state
from ldm.checkpoints.sd_single_file import module_from_state, read_sd_file
from ldm.data.latents import require_same_encoders
from ldm.diffusion.objectives import diffusion_target, loss_weight, offset_noise
from ldm.diffusion.samplers import DDIMSampler
from ldm.errors import ConfigError
from ldm.inference.model import LatentDiffusionModel
from ldm.inference.pipeline import generate_images
from ldm.modules.conditioning import Conditioner, Conditioning, TextConditioner, build_conditioner, unet_forward
from ldm.modules.ema import EMA
from ldm.modules.latent_codec import LatentCodec
from ldm.training.callbacks import to_grid
from ldm.training.config import to_plain
from ldm.training.loggers import logs_this_step
from ldm.training.lr_schedules import warmup_cosine
from ldm.training.nonfinite import NonFiniteGuard, min_over_ranks

log = logging.getLogger(__name__)
STAGE = "ldm"


class LatentDiffusionModule(pl.LightningModule):
    """UNet(z_t, t, c) -> eps (or v), on z = scale_factor * encode(x).sample(), c = conditioner(batch).

    The conditioner (`conditioning` config: text, class, none, inpaint, superres; `ldm.modules.conditioning`)
    turns a batch into what the UNet takes and drops it to its unconditional value at its own rate; this
    module knows it only through that interface. The autoencoder and the conditioner's networks (the
    text encoder) are frozen, in eval mode, out of the optimizer, and run in fp32 even under mixed
    precision (GroupNorm in half precision gives NaNs in VAEs). Their weights are kept in this module's
    checkpoint, so sampling conditions and decodes exactly as training did without the stage-1 file.

    Batches are either ``{"image", "caption", ...}``, encoded here, or from a latent cache (``data=latents``,
    text conditioning): ``{"latent_mean", "latent_std", "context", "caption"}``, the encoders' outputs
    computed once beforehand; the latent is then sampled from the cached posterior, and a dropped
    caption's embedding becomes the text encoder's embedding of "". Both give the same loss for the same
    batch and random state.
    """

    def __init__(
        self,
        model: dict,
        conditioning: dict,
        schedule: dict,
        optimizer: dict,
        autoencoder: dict | None = None,
        autoencoder_ckpt: str | None = None,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        scale_factor: float | None = None,
        scale_factor_batches: int = 8,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        lr_warmup_steps: int = 0,
        lr_decay_start: int | None = None,
        lr_decay_steps: int | None = None,
        lr_min_ratio: float = 0.0,
        validation_prompts: list[str] | None = None,
        sample_steps: int = 25,
        guidance_scale: float = 5.0,
        timestep_buckets: int = 4,
        max_nonfinite_steps: int = 10,
        conditioner_state: Mapping[str, Tensor] | None = None,
        init_from: str | None = None,
        init_from_ema: bool = False,
        init_from_prediction: str | None = None,
    ) -> None:
        """`autoencoder_ckpt` is a stage-1 checkpoint (its config and weights are used); `autoencoder`,
        a config, builds one whose weights come later (`from_checkpoint`). `conditioning` is the
        conditioner's config; `conditioner_state` (its own keys) builds its networks on those tensors instead
        of their configured source.

        `init_from` is a Stable Diffusion 1.x / 2.x single file instead: the UNet starts from its weights
        (`init_from_ema`: from its EMA weights, when it has them), its autoencoder and text encoder are
        used frozen, and the file decides the networks' configs (the UNet keeps the configured
        `gradient_checkpointing`), the schedule, the prediction
        (`init_from_prediction` where its kind does not say: SD 2.x-base is eps) and, unless
        `scale_factor` is set, the latent scale (0.18215). The checkpoints keep everything, as ever."""
        super().__init__()
        model, conditioning, schedule, optimizer = map(to_plain, (model, conditioning, schedule, optimizer))
        self.init_from = init_from
        sd = None
        if init_from:
            if autoencoder_ckpt:
                raise ConfigError("Give init_from=<SD file> (its own autoencoder) or autoencoder_ckpt=<stage-1 checkpoint>, not both.")
            conditioning = {"_target_": TEXT_CONDITIONER, **conditioning}
            if hydra.utils.get_class(conditioning["_target_"]) is not TextConditioner:
                raise ConfigError("init_from=<SD file> fine-tunes a text-to-image model: it needs conditioning=text.")
            sd = read_sd_file(init_from, use_ema=init_from_ema, prediction=init_from_prediction)
            sd.unet_config["gradient_checkpointing"] = bool(model.get("gradient_checkpointing", False))  # memory, not the network
            model, schedule, autoencoder = sd.unet_config, sd.schedule_config, sd.autoencoder_config
            conditioning = {**conditioning, "encoder": sd.text_encoder_config}
            prediction, conditioner_state = sd.prediction, {f"text_encoder.{k}": v for k, v in sd.text_encoder.items()}
            scale_factor = scale_factor or sd.scale_factor
            log.info("Starting from %s (Stable Diffusion %s, %s UNet weights): %s prediction, scale factor %.5f; its UNet, "
                     "autoencoder, text encoder and schedule replace the configured ones.", init_from, sd.version[-1] + ".x",
                     sd.weights, prediction, scale_factor)
        self.autoencoder_source = init_from or autoencoder_ckpt or "the checkpoint's own weights"
        if sd is not None:
            autoencoder_module = module_from_state(autoencoder, sd.autoencoder, "autoencoder", init_from)
        elif autoencoder_ckpt or autoencoder is None:
            autoencoder_module, autoencoder = self._autoencoder_from_checkpoint(autoencoder_ckpt)
        else:
            autoencoder = to_plain(autoencoder)
            autoencoder_module = hydra.utils.instantiate(autoencoder)
        try:
            conditioner = build_conditioner(conditioning, conditioner_state)
        except ValueError as err:
            raise ConfigError(f"conditioning: {err}") from err
        model = conditioner.unet_config(model, autoencoder_module.latent_channels)
        self.save_hyperparameters(
            {
                "stage": STAGE,
                "model": model,
                "conditioning": conditioning,
                "schedule": schedule,
                "optimizer": optimizer,
                "autoencoder": autoencoder,
                "prediction": prediction,
                "loss_weighting": loss_weighting,
                "min_snr_gamma": min_snr_gamma,
                "offset_noise": offset_noise,
                "scale_factor_batches": scale_factor_batches,
                "ema_decay": ema_decay,
                "ema_warmup": ema_warmup,
                "lr_warmup_steps": lr_warmup_steps,
                "lr_decay_start": lr_decay_start,
                "lr_decay_steps": lr_decay_steps,
                "lr_min_ratio": lr_min_ratio,
                "validation_prompts": list(validation_prompts or []),
                "sample_steps": sample_steps,
                "guidance_scale": guidance_scale,
                "timestep_buckets": timestep_buckets,
                "max_nonfinite_steps": max_nonfinite_steps,
            }
        )
        self.autoencoder = autoencoder_module.eval().requires_grad_(False)
        self.conditioner: Conditioner = conditioner.eval().requires_grad_(False)
        self.unet = hydra.utils.instantiate(model) if sd is None else module_from_state(model, sd.unet, "UNet", init_from)
        self.ema = EMA(self.unet, decay=ema_decay, warmup=ema_warmup)
        self.schedule = hydra.utils.instantiate(schedule)
        if prediction == "eps" and self.schedule.zero_terminal_snr:
            raise ConfigError(
                "prediction=eps cannot be sampled from a zero-terminal-SNR schedule (at t = T the noise is the "
                "whole input, so ε says nothing about the image): use stage.module.prediction=v, or schedule=scaled_linear."
            )
        # 0 means "not measured yet"; the buffer goes into checkpoints, so a resumed run reuses it.
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor or 0.0), dtype=torch.float64))
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)

    @staticmethod
    def _autoencoder_from_checkpoint(path: str | None) -> tuple[nn.Module, dict]:
        if not path:
            raise FileNotFoundError(
                "stage=ldm needs a trained autoencoder: set autoencoder_ckpt=PATH/TO/last.ckpt "
                "(train one first with `python train.py stage=autoencoder`)."
            )
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"Autoencoder checkpoint {path} does not exist. Train one first with "
                "`python train.py stage=autoencoder`, then pass autoencoder_ckpt=<run_dir>/checkpoints/last.ckpt."
            )
        hint = "autoencoder_ckpt must be the last.ckpt of a stage-1 run (`python train.py stage=autoencoder`)."
        return autoencoder_from_checkpoint(read_checkpoint(path), path, hint)

    def check_image_size(self, size: int) -> None:
        """Training images must map onto whole latent pixels that the UNet can halve at each level."""
        ae, unet = self.autoencoder.downsample_factor, getattr(self.unet, "downsample_factor", 1)
        if size <= 0 or size % (ae * unet):
            raise ConfigError(
                f"image_size={size}: stage 2 needs a multiple of {ae * unet} (the autoencoder downsamples by {ae}, "
                f"the UNet by {unet} more); e.g. image_size={max(ae * unet, size - size % (ae * unet))}."
            )

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "LatentDiffusionModule":
        """Rebuilds a trained module from its checkpoint alone (no YAML, no stage-1 file, no download)."""
        ckpt = read_checkpoint(path)
        require_stage(ckpt, STAGE, path)
        hparams, state = upgrade_stage2_hparams(ckpt["hyper_parameters"]), upgrade_stage2_state(ckpt["state_dict"])
        hparams.pop("stage", None)
        module = cls(**hparams, autoencoder_ckpt=None, conditioner_state=sub_state_dict(state, "conditioner."))
        module.load_state_dict(state, strict=True)
        return module.to(map_location).eval()

    def _apply(self, fn, *args, **kwargs):
        """Moves the (non-Module) noise schedule along with the module's tensors."""
        result = super()._apply(fn, *args, **kwargs)
        self.schedule.to(self.scale_factor.device)
        return result

    def train(self, mode: bool = True) -> "LatentDiffusionModule":
        super().train(mode)
        self.autoencoder.eval()
        self.conditioner.eval()
        return self

    # --- conditioning and latents -------------------------------------------------------------

    def conditioning_of(self, batch: dict, dropout: bool) -> Conditioning:
        """What the UNet is conditioned on for a batch; with `dropout`, each sample's is the conditioner's
        unconditional value with the conditioner's drop rate."""
        return self.conditioner(batch, self.codec, dropout)

    @property
    def codec(self) -> LatentCodec:
        """Images <-> scaled latents through the frozen autoencoder and this run's scale factor."""
        return LatentCodec(self.autoencoder, self.scale_factor)

    @torch.no_grad()
    def _posterior_sample(self, batch: dict) -> Tensor:
        """An unscaled latent per image: encoded from `image`, or drawn from the cached posterior
        (`latent_mean`, `latent_std`) with the same draw the autoencoder's posterior makes."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(self.device).float(), batch["latent_std"].to(self.device).float()
            return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return self.codec.posterior(batch["image"]).sample()

    def latents_of(self, batch: dict) -> Tensor:
        """z0 = scale_factor * a posterior sample, for a batch of images or of cached latents."""
        return self.codec.scale(self._posterior_sample(batch))

    @torch.no_grad()
    def measure_scale_factor(self, batches) -> float:
        """1 / std of the autoencoder's latents over `batches`, all-reduced over every rank."""
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in batches:
            z = self._posterior_sample(batch).double()
            stats += torch.stack([z.sum(), z.square().sum(), torch.tensor(float(z.numel()), device=self.device, dtype=torch.float64)])
        if self._trainer is not None:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        mean = stats[0] / stats[2]
        std = (stats[1] / stats[2] - mean.square()).sqrt()
        return float(1.0 / std)

    def on_fit_start(self) -> None:
        """With a latent cache, checks that it was made by this module's autoencoder and text encoder."""
        cache = getattr(self.trainer.datamodule, "latent_cache", None)
        if cache is not None:
            if not isinstance(self.conditioner, TextConditioner):
                raise ConfigError(f"data=latents holds text embeddings: it trains conditioning=text, not conditioning={self.conditioner.kind}.")
            require_same_encoders(cache, state_dict_sha256(self.autoencoder), state_dict_sha256(self.conditioner.text_encoder),
                                  autoencoder_source=self.autoencoder_source)

    def on_train_start(self) -> None:
        if float(self.scale_factor) > 0:
            log.info("Latent scale factor: %.5f (from config or checkpoint; not re-measured)", float(self.scale_factor))
            return
        n = self.hparams.scale_factor_batches
        # A loader of its own: iterating the trainer's would move the resumable data order it checkpoints.
        datamodule = self.trainer.datamodule
        loader = datamodule.train_dataloader() if datamodule is not None else self.trainer.train_dataloader
        batches = (b for _, b in zip(range(n), loader))
        self.scale_factor.fill_(self.measure_scale_factor(batches))
        log.info("Latent scale factor measured over %d batches on every rank: %.5f", n, float(self.scale_factor))
        self._record_scale_factor()

    def _record_scale_factor(self) -> None:
        """Writes the measured factor into the run's `config.yaml` (`stage.module.scale_factor`), where a
        reader of the run looks for it; rank 0 only."""
        if not self.trainer.is_global_zero:
            return
        config = Path(self.trainer.default_root_dir) / "config.yaml"
        if config.is_file():
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(config)
            if OmegaConf.select(cfg, "stage.module") is not None:
                cfg.stage.module.scale_factor = float(self.scale_factor)
                OmegaConf.save(cfg, config)

    # --- training ---------------------------------------------------------------------------

    def diffusion_loss(self, z0: Tensor, cond: Conditioning | Tensor, t: Tensor, noise: Tensor, unet: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """Weighted per-sample loss (B,) and the batch mean; `cond` is a conditioning (a bare tensor: a
        cross-attention context)."""
        unet = self.unet if unet is None else unet
        z_t = self.schedule.q_sample(z0, t, noise)
        target = diffusion_target(self.schedule, z0, noise, t, prediction=self.hparams.prediction)
        pred = unet_forward(unet, z_t, t, cond)
        per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
        weights = loss_weight(self.schedule, t, self.hparams.loss_weighting, self.hparams.min_snr_gamma, self.hparams.prediction)
        per_sample = per_sample * weights
        return per_sample, per_sample.mean()

    def _draw_t_and_noise(self, z0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Timesteps on the CPU (so their buckets are known without reading the device) and noise like z0.

        With a CPU `generator` both are drawn from it, so validation sees the same values on any device.
        """
        t = torch.randint(0, self.schedule.num_timesteps, (z0.shape[0],), generator=generator)
        if self.hparams.offset_noise > 0:
            noise = offset_noise(z0, self.hparams.offset_noise, generator=generator)
        elif generator is not None:
            noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
        else:
            noise = torch.randn_like(z0)
        return t, noise

    def _log_buckets(self, per_sample: Tensor, t: Tensor, split: str, skip_empty: bool, **log_kwargs: Any) -> None:
        """The loss by timestep range, each bucket logged with its sample count as the batch size, so
        that epoch means weigh every sample equally. `skip_empty=False` logs an empty bucket with weight 0,
        for metrics synced over ranks, where every rank must log the same keys."""
        n, num_timesteps = self.hparams.timestep_buckets, self.schedule.num_timesteps
        bucket = t * n // num_timesteps
        counts = torch.bincount(bucket, minlength=n).tolist()
        sums = torch.zeros(n, device=per_sample.device).index_add_(0, bucket.to(per_sample.device), per_sample.detach().float())
        for i, count in enumerate(counts):
            if count == 0 and skip_empty:
                continue
            first, last = -(-i * num_timesteps // n), -(-(i + 1) * num_timesteps // n) - 1
            self.log(f"{split}/loss_t{first}-{last}", sums[i] / max(count, 1), batch_size=count, **log_kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        z0 = self.latents_of(batch)
        cond = self.conditioning_of(batch, dropout=True)
        t, noise = self._draw_t_and_noise(z0)
        per_sample, loss = self.diffusion_loss(z0, cond, t.to(z0.device), noise)
        if not self.nonfinite.check(loss, self.global_step, sync=min_over_ranks(self)):
            return None
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=z0.shape[0])
        if logs_this_step(self):
            self._log_buckets(per_sample, t, "train", skip_empty=True, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Called by Lightning once per real optimizer step (after gradient accumulation)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.ema.update(self.unet)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The EMA UNet's loss on noise and timesteps fixed per batch, comparable across validations."""
        if float(self.scale_factor) == 0.0:
            return  # a sanity check before on_train_start measured the scale factor: every latent would be 0
        generator = torch.Generator().manual_seed(1000 + batch_idx)
        z0 = self.latents_of(batch)
        cond = self.conditioning_of(batch, dropout=False)
        t, noise = self._draw_t_and_noise(z0, generator=generator)
        per_sample, loss = self.diffusion_loss(z0, cond, t.to(z0.device), noise, unet=self.ema.module)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=z0.shape[0])
        self._log_buckets(per_sample, t, "val", skip_empty=False, on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(self.unet.parameters())
        h = self.hparams
        multiplier = warmup_cosine(h.lr_warmup_steps, h.lr_decay_steps, h.lr_min_ratio, h.lr_decay_start)
        scheduler = LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- sampling ---------------------------------------------------------------------------

    def generation_model(self, use_ema: bool = True) -> LatentDiffusionModel:
        """This module's networks (not copies) as the model `ldm.inference` generates with."""
        return LatentDiffusionModel(
            unet=self.ema.module if use_ema else self.unet,
            autoencoder=self.autoencoder,
            conditioner=self.conditioner,
            schedule=self.schedule,
            prediction=self.hparams.prediction,
            scale_factor=self.scale_factor,
            image_size=self.hparams.autoencoder.get("resolution", 64),
        )

    @torch.no_grad()
    def log_images(self, batch: dict) -> dict[str, Tensor]:
        """Validation prompts (or what the conditioner takes from this batch), image k from seed k: guided
        on the top row, unguided below (EMA weights)."""
        prompts = self.hparams.validation_prompts
        request = self.conditioner.example_request(batch, prompts, len(prompts) or 8)
        size = batch["image"].shape[-1] if "image" in batch else batch["latent_mean"].shape[-1] * self.autoencoder.downsample_factor
        sampler = DDIMSampler(self.schedule, self.hparams.sample_steps, eta=0.0)
        model, seeds = self.generation_model(), list(range(request.batch_size))
        inputs = dict(height=size, width=size, class_labels=request.class_labels, init_image=request.image, mask=request.mask)
        guided = generate_images(model, sampler, request.prompts, seeds, guidance_scale=self.hparams.guidance_scale, **inputs)
        unguided = generate_images(model, sampler, request.prompts, seeds, guidance_scale=1.0, **inputs)
        return {"samples": to_grid([guided, unguided], nrow=min(request.batch_size, 8))}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ldm_stage"] = STAGE
        if self.init_from:
            checkpoint["init_from"] = str(self.init_from)
        checkpoint["nonfinite"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        path = self._trainer.ckpt_path if self._trainer is not None else None
        require_stage(checkpoint, STAGE, path, hint="stage=ldm resumes only from a stage-2 checkpoint (ckpt_path=...).")
        checkpoint["state_dict"] = upgrade_stage2_state(checkpoint["state_dict"])
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])

    def compile_network(self, **kwargs) -> None:
        """`torch.compile` the UNet in place (its parameter names, so checkpoints and the EMA, do not change)."""
        self.unet.compile(**kwargs)


