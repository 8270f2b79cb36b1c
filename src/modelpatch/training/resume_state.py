"""What a checkpoint holds, beyond Lightning's own state, for a resumed run to be the run that was never
interrupted: the best validation accuracy so far, the current epoch's training sums (every rank's), how
many rows ``metrics.csv`` had when the checkpoint was written, and the epoch's training metrics where they
were still to be written: Lightning writes the checkpoint of an epoch's end before it hands that epoch's
metrics to the loggers, and does not end the epoch again in the resumed run (so this writes them)."""

from __future__ import annotations

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

    def __init__(self):
        self.trainer = self.module = None
        self.restored: dict | None = None

    def _unwritten_epoch_metrics(self) -> tuple[int, int, dict[str, float]] | None:
        """(epoch, step, metrics) of an epoch whose end is running: its metrics computed, not yet logged."""
        progress = self.trainer.fit_loop.epoch_progress.current
        if progress.processed <= progress.completed or self.module.last_train_epoch is None:
            return None
        metrics = {k: float(v) for k, v in self.module.last_train_epoch.items()}
        return self.trainer.current_epoch, self.trainer.global_step - 1, metrics

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer, self.module = trainer, pl_module

    def state_dict(self) -> dict:
        if self.module is None:
            return {}
        stats = self.module.train_stats
        rows = [lg.rows_written() for lg in self.trainer.loggers if isinstance(lg, CSVLogger)]
        return {
            "val_acc_best": self.module.val_acc_best.max_value.detach().cpu().clone(),
            "train_sums": {name: _gather(getattr(stats, name)) for name in SUMS},
            "csv_rows": rows[0] if rows and rows[0] is not None else 0,  # rank zero's (it writes the log)
            "unwritten_epoch_metrics": self._unwritten_epoch_metrics(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.restored = dict(state) or None

    def on_fit_start(self, trainer, pl_module) -> None:
        rows = self.restored["csv_rows"] if self.restored else 0  # a fresh run starts the log afresh
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.keep_rows(rows)

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.val_acc_best.reset()
        pl_module.train_stats.reset()
        if not self.restored:
            return
        pl_module.val_acc_best.update(self.restored["val_acc_best"].to(pl_module.device))
        rank = trainer.global_rank
        for name, per_rank in self.restored["train_sums"].items():
            if rank < len(per_rank):
                setattr(pl_module.train_stats, name, per_rank[rank].to(pl_module.device))
        unwritten = self.restored["unwritten_epoch_metrics"]
        if unwritten is not None and trainer.is_global_zero:
            epoch, step, metrics = unwritten
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "epoch": epoch}, step=step)
        self.restored = None
