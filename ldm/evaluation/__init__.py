"""Measurements of what a trained model does."""

from ldm.evaluation.shapes_detector import detect, detect_batch, score

__all__ = ["detect", "detect_batch", "score"]
