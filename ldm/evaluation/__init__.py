"""Measurements of what a trained model does: `ldm.evaluation.shapes_detector` reads a shapes image's
attributes back; `ldm.evaluation.prompt_following` scores a text-to-image model's prompt following
with it (imported on its own, since it loads models and samples)."""

from ldm.evaluation.shapes_detector import detect, detect_batch, score

__all__ = ["detect", "detect_batch", "score"]
