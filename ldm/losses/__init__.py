"""Training losses: the stage-1 autoencoder loss and the perceptual distances it uses."""

from ldm.losses.autoencoder_loss import AutoencoderLoss
from ldm.losses.perceptual import LPIPS, ShiftTolerantLPIPS

__all__ = ["AutoencoderLoss", "LPIPS", "ShiftTolerantLPIPS"]
