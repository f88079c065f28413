"""The one exception base of user errors: what `train.py`, `sample.py` and the tools print as one line.

A user error is something the person running the command can fix (a wrong path, a checkpoint of the
wrong stage, a bad option, a file that is not safe to read). Bugs stay ordinary exceptions, with their
tracebacks.
"""

from __future__ import annotations


class LdmError(Exception):
    """A problem with the input of a run that the user can fix; printed as `error: <message>`."""


class ConfigError(LdmError, ValueError):
    """A config that cannot be built or cannot train (a wrong key, a value out of range)."""


class CheckpointError(LdmError, ValueError):
    """A checkpoint file that cannot be used here: missing, unreadable, unsafe, or of the wrong kind."""


class CheckpointStageError(CheckpointError):
    """A checkpoint of one stage was given where another stage's is needed."""


class SamplingInputError(LdmError, ValueError):
    """Bad input to sampling (prompts, images, sizes, sampler options)."""


class EvaluationError(LdmError, ValueError):
    """Bad input to `python evaluate.py` or the metrics (a wrong option, too few images for a metric)."""


class MetricWeightsError(LdmError, FileNotFoundError):
    """The weights a metric needs (the FID InceptionV3) are not on this machine or cannot be read safely."""
