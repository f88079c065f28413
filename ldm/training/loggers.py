"""Loggers that continue a run's existing logs when it resumes, and when a step's metrics are written."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment


def logs_this_step(module: pl.LightningModule) -> bool:
    """Whether the loggers write this training step's metrics (every `trainer.log_every_n_steps`, and the
    last step). Metrics only the loggers read need not be built on the other steps: each `self.log`
    costs Lightning a walk over its whole result collection."""
    trainer = module._trainer
    return trainer is None or trainer._logger_connector.should_update_logs


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, appending to the run's `metrics.csv` when the run resumes.

    Lightning's writer deletes an existing `metrics.csv` when a new process creates it, so a resumed
    run would lose the rows of the runs before it. Here the file is kept, and the writer starts from
    its columns, so the resumed run appends (adding columns rewrites the file with all its rows).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / _ExperimentWriter.NAME_METRICS_FILE
        previous = path.read_bytes() if path.is_file() else None
        experiment = super().experiment  # deletes an existing metrics.csv
        if previous is not None:
            path.write_bytes(previous)
            with open(path, newline="") as f:
                experiment.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
        return experiment
