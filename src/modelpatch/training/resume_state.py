"""What a checkpoint holds, beyond Lightning's own state, for a resumed run to be the run that was never
interrupted: the best validation accuracy so far, the current epoch's training sums (every rank's), how
many rows ``metrics.csv`` had when the checkpoint was written, and the epoch's training metrics where they
were still to be written: Lightning writes the checkpoint of an epoch's end before it hands that epoch's
metrics to the loggers, and does not end the epoch again in the resumed run (so this writes them). Also the
run's time so far, so that a resumed run's ``wall_time_s`` counts its earlier processes."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback

from modelpatch.training.csv_log import CSVLogger

SUMS = ("loss_sum", "correct", "total")  # training.metrics.TaskTrainStats


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """``tensor`` of every rank, in rank order (every rank calls this: Lightning builds checkpoints on each)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [tensor.detach().cpu().clone()]
    out = [torch.zeros_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, tensor.detach().contiguous())
    return [t.cpu() for t in out]


class ResumeState(Callback):
    """Saves and restores, with each checkpoint, the parts of a ``PatchModule`` run Lightning does not."""

    def __init__(self, started: float | None = None):
        self.trainer = self.module = None
        self.restored: dict | None = None
        self.fitted = False  # fit has run in this process (validate/test then keep its log)
        self.started = time.time() if started is None else started  # this process's start of the run
        self.earlier_s = 0.0  # the run's time before this process, up to the checkpoint it resumed from

    def elapsed_s(self) -> float:
        """The run's wall time: this process's so far, and its earlier processes' up to the resumed checkpoint."""
        return self.earlier_s + time.time() - self.started

    def _unwritten_epoch_metrics(self) -> tuple[int, int, dict[str, float]] | None:
        """(epoch, step, metrics) of an epoch whose end is running: its metrics computed, not yet logged."""
        progress = self.trainer.fit_loop.epoch_progress.current
        if progress.processed <= progress.completed or self.module.last_train_epoch is None:
            return None
        metrics = {k: float(v) for k, v in self.module.last_train_epoch.items()}
        return self.trainer.current_epoch, self.trainer.global_step - 1, metrics

    def state_dict(self) -> dict:
        if self.module is None:
            return {}
        stats = self.module.train_stats
        csv = [lg for lg in self.trainer.loggers if isinstance(lg, CSVLogger)]
        rows = csv[0].rows_written() if csv else None  # rank zero's (it writes the log); None elsewhere
        return {
            "val_acc_best": self.module.val_acc_best.max_value.detach().cpu().clone(),
            "train_sums": {name: _gather(getattr(stats, name)) for name in SUMS},
            "csv_rows": rows or 0,
            "csv_dir": csv[0].log_dir if csv else None,
            "unwritten_epoch_metrics": self._unwritten_epoch_metrics(),
            "elapsed_s": self.elapsed_s(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.restored = dict(state) or None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer, self.module = trainer, pl_module
        if stage != "fit" and not self.fitted:  # only evaluating (train=false): a log of its own
            self.fitted = True
            self._keep_csv_rows(trainer, 0, None)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Restore (here: Lightning skips the training loop, and its hooks, of a run resumed after its final
        checkpoint) and cut the CSV log back to the checkpoint's rows (all, for a fresh run)."""
        self.fitted = True
        restored, self.restored = self.restored or {}, None
        self._keep_csv_rows(trainer, restored.get("csv_rows", 0), restored.get("csv_dir"))
        pl_module.val_acc_best.reset()
        pl_module.train_stats.reset()
        if not restored:
            return
        self.earlier_s = restored.get("elapsed_s", 0.0)  # none in checkpoints written before it was kept
        pl_module.val_acc_best.update(restored["val_acc_best"].to(pl_module.device))
        for name, per_rank in restored["train_sums"].items():
            if trainer.global_rank < len(per_rank):
                setattr(pl_module.train_stats, name, per_rank[trainer.global_rank].to(pl_module.device))
        unwritten = restored["unwritten_epoch_metrics"]
        if unwritten is not None and trainer.is_global_zero:
            epoch, step, metrics = unwritten
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "epoch": epoch}, step=step)

    @staticmethod
    def _keep_csv_rows(trainer, rows: int, written_in: str | None) -> None:
        """Keep the log's first ``rows`` rows if the checkpoint was written with this log (``ckpt_path`` from
        another run's folder: none)."""
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.keep_rows(rows if written_in == logger.log_dir else 0)
