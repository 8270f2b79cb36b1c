"""The CSV log of a run (``csv/metrics.csv``) that survives kills and resumes: Lightning's ``CSVLogger``, except
that an existing file is continued (Lightning's deletes it when a run starts) and rewritten atomically, and that
a resumed run keeps exactly the rows written before its checkpoint (``training.resume_state``)."""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from modelpatch.atomic import atomic_write


class ContinuedWriter(ExperimentWriter):
    """Lightning's writer of ``metrics.csv``, continuing the file it finds (its columns and rows)."""

    def __init__(self, log_dir: str):
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            header, _ = self._read()
            self.metrics_keys = list(header)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        pass

    def _read(self) -> tuple[list[str], list[dict]]:
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _write(self, fieldnames: list[str], rows: list[dict]) -> None:
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.metrics_file_path, write)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._write(fieldnames, self._read()[1])

    def rows_written(self) -> int:
        """Rows in the file, after writing those still held in memory."""
        self.save()
        return len(self._read()[1]) if os.path.isfile(self.metrics_file_path) else 0

    def keep_rows(self, n: int) -> None:
        """Keep the file's first ``n`` rows (none: no file), dropping a half-written last line too."""
        if not os.path.isfile(self.metrics_file_path):
            return
        if n == 0:
            os.remove(self.metrics_file_path)
            self.metrics_keys = []
            return
        header, rows = self._read()
        if len(rows) != n:
            self._write(header, [{k: v for k, v in r.items() if k is not None} for r in rows[:n]])


class CSVLogger(LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` writing through ``ContinuedWriter``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuedWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def rows_written(self) -> int:
        return self.experiment.rows_written()

    @rank_zero_only
    def keep_rows(self, n: int) -> None:
        self.experiment.keep_rows(n)
