"""Measurements of what a trained model does: `ldm.evaluation.shapes_detector` reads a shapes image's
attributes back; `ldm.evaluation.prompt_following` scores a text-to-image model's prompt following
with it; the field's metrics (FID, KID, IS, precision/recall; PSNR, SSIM, LPIPS, rFID) over the standard
FID InceptionV3 are `ldm.evaluation.metrics` and `ldm.evaluation.inception`, and `ldm.evaluation.evaluate`
is what `python evaluate.py` does (each imported on its own, since they load networks)."""

from ldm.evaluation.shapes_detector import detect, detect_batch, score

__all__ = ["detect", "detect_batch", "score"]
