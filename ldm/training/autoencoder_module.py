"""Stage 1: the LightningModule that trains a KL autoencoder against a delayed patch-GAN."""

from __future__ import annotations

import hydra
import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.checkpoints import require_stage
from ldm.errors import ConfigError
from ldm.training.callbacks import to_grid
from ldm.training.config import to_plain
from ldm.training.loggers import logs_this_step
from ldm.training.lr_schedules import warmup_cosine
from ldm.training.nonfinite import NonFiniteGuard, min_over_ranks

STAGE = "autoencoder"


class AutoencoderModule(pl.LightningModule):
    """Trains `model` (a KLAutoencoder) with `loss` (an AutoencoderLoss holding the discriminator).

    Manual optimization with two optimizers. All schedule decisions (discriminator on/off,
    warm-up) use `generator_step`, the number of autoencoder updates, never Lightning's
    `global_step`, which counts every `optimizer.step()` of both optimizers.
    """

    def __init__(
        self,
        model: dict,
        loss: dict,
        optimizer: dict,
        disc_optimizer: dict,
        lr_warmup_steps: int = 0,
        lr_decay_steps: int | None = None,
        lr_min_ratio: float = 0.0,
        gradient_clip_val: float | None = None,
        num_logged_images: int = 8,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        model, loss = to_plain(model), to_plain(loss)
        optimizer, disc_optimizer = to_plain(optimizer), to_plain(disc_optimizer)
        self.save_hyperparameters(
            {
                "stage": STAGE,
                "model": model,
                "loss": loss,
                "optimizer": optimizer,
                "disc_optimizer": disc_optimizer,
                "lr_warmup_steps": lr_warmup_steps,
                "lr_decay_steps": lr_decay_steps,
                "lr_min_ratio": lr_min_ratio,
                "gradient_clip_val": gradient_clip_val,
                "num_logged_images": num_logged_images,
                "max_nonfinite_steps": max_nonfinite_steps,
            }
        )
        self.automatic_optimization = False
        self.autoencoder = hydra.utils.instantiate(model)
        self.loss = hydra.utils.instantiate(loss)
        self.generator_step = 0
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def forward(self, x: Tensor) -> Tensor:
        posterior = self.autoencoder.encode(x)
        return self.autoencoder.decode(posterior.mode())

    def check_image_size(self, size: int) -> None:
        """Training images must be a multiple of the autoencoder's downsampling factor."""
        factor = self.autoencoder.downsample_factor
        if size <= 0 or size % factor:
            raise ConfigError(f"image_size={size}: the autoencoder downsamples by {factor}, so image_size must be a "
                              f"multiple of {factor} (e.g. {max(factor, size - size % factor)}).")

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict]]:
        """Autoencoder optimizer (warm-up + cosine decay, in generator steps) and discriminator optimizer
        (constant rate: it only starts at `disc_start`)."""
        ae_params = list(self.autoencoder.parameters()) + list(self.loss.generator_parameters())
        opt_ae = hydra.utils.instantiate(self.hparams.optimizer)(ae_params)
        opt_d = hydra.utils.instantiate(self.hparams.disc_optimizer)(self.loss.discriminator.parameters())
        multiplier = warmup_cosine(self.hparams.lr_warmup_steps, self.hparams.lr_decay_steps, self.hparams.lr_min_ratio)
        return [opt_ae, opt_d], [{"scheduler": LambdaLR(opt_ae, multiplier), "interval": "step"}]

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_ae, opt_d = self.optimizers()
        x = batch["image"]
        step = self.generator_step
        reconstructions, posterior = self.autoencoder(x)

        discriminator = self.loss.discriminator
        discriminator.requires_grad_(False)
        g_loss, g_logs = self.loss.generator_loss(x, reconstructions, posterior, step, self.autoencoder.last_layer)
        if not self.nonfinite.check(g_loss, step, sync=min_over_ranks(self)):
            return  # not an autoencoder step: the schedule, disc_start and max_steps count the ones taken
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        self._clip(opt_ae)
        opt_ae.step()
        logs = {f"train/{k}": v for k, v in g_logs.items()}

        if self.loss.discriminator_active(step):
            discriminator.requires_grad_(True)
            d_loss, d_logs = self.loss.discriminator_loss(x, reconstructions.detach(), step)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            opt_d.step()
            logs.update({f"train/{k}": v for k, v in d_logs.items()})

        self.lr_schedulers().step()
        self.generator_step += 1
        self.log("train/total", logs.pop("train/total"), prog_bar=True, on_step=True, on_epoch=False)
        if logs_this_step(self):
            logs["train/generator_step"] = float(self.generator_step)
            self.log_dict(logs, on_step=True, on_epoch=False)

    def _clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Lightning refuses `trainer.gradient_clip_val` under manual optimization, so the module clips."""
        clip = self.hparams.gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        reconstructions, posterior = self.autoencoder(x, sample_posterior=False)
        rec_l1 = (x - reconstructions).abs().mean()
        x01 = ((x.float() + 1) / 2).clamp(0, 1)
        r01 = ((reconstructions.float() + 1) / 2).clamp(0, 1)
        self.val_psnr.update(r01, x01)
        self.val_ssim.update(r01, x01)
        self.log("val/rec_l1", rec_l1, on_epoch=True, sync_dist=True)
        self.log("val/kl", posterior.kl().mean(), on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True, sync_dist=False)
        self.log("val/ssim", self.val_ssim.compute(), sync_dist=False)
        self.val_psnr.reset()
        self.val_ssim.reset()

    @torch.no_grad()
    def log_images(self, batch: dict) -> dict[str, Tensor]:
        x = batch["image"].to(self.device)
        return {"reconstructions": to_grid([x, self(x)])}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ldm_stage"] = STAGE
        checkpoint["generator_step"] = self.generator_step
        checkpoint["nonfinite"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainer = getattr(self, "_trainer", None)
        require_stage(checkpoint, STAGE, trainer.ckpt_path if trainer is not None else None,
                      hint="stage=autoencoder resumes only from a stage-1 checkpoint (ckpt_path=...).")
        self.generator_step = int(checkpoint["generator_step"])
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])

    def compile_network(self, **kwargs) -> None:
        """`torch.compile` the autoencoder in place (its parameter names, so checkpoints, do not change)."""
        self.autoencoder.compile(**kwargs)


def optimizer_steps_for(generator_steps: int, disc_start: int) -> int:
    """Lightning `max_steps` (optimizer steps of both optimizers) that stops after `generator_steps`."""
    if generator_steps < 0:
        return generator_steps
    return generator_steps + max(0, generator_steps - disc_start)


__all__ = ["AutoencoderModule", "optimizer_steps_for", "STAGE"]
