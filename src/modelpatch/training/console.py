"""What a run prints: a progress bar on a terminal, progress lines elsewhere, and no Lightning noise.

- :func:`progress_bar` (``callbacks.progress`` in ``conf/callbacks/default.yaml``): Lightning's bar when
  stderr is a terminal; otherwise (SLURM, CI, the GPU pool, a pipe) :class:`ProgressLines`, one log line
  per epoch and per ``every_percent`` of a long epoch, also written to the run's log (a bar without a
  terminal shows nothing until an epoch ends, then box characters, or carriage returns for tqdm).
- :func:`quiet_lightning`: drops Lightning's "Tip: ... litlogger / litmodels" advertisements and the
  deprecation warning Lightning's own code triggers in torch (``LeafSpec``) at every fit and test.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

log = logging.getLogger("modelpatch")

LIGHTNING_TIP = "💡 Tip:"  # how Lightning starts its advertisements (rank_zero_info)
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
# on a machine with SLURM installed: a hint to prepend `srun`, wrong here (hydra/launcher=slurm submits the jobs)
SRUN_HINT = r"The `srun` command is available on your system but is not used"


class ProgressLines(ProgressBar):
    """Training progress as log lines: one when an epoch ends (its time, loss and validation metrics), and
    one at each ``every_percent`` of an epoch that takes longer than ``min_interval_s`` between lines."""

    def __init__(self, every_percent: int = 10, min_interval_s: float = 60.0):
        super().__init__()
        if not 0 < every_percent <= 100:
            raise ValueError(f"callbacks.progress.every_percent={every_percent}: choose 1 to 100")
        self.every_percent = every_percent
        self.min_interval_s = min_interval_s
        self._enabled = True
        self._epoch_start = self._last_line = 0.0
        self._next_percent = every_percent

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _epoch(self, trainer) -> str:
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        return f"epoch {trainer.current_epoch + 1}{total}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._last_line = time.monotonic()
        self._next_percent = self.every_percent

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        total = self.total_train_batches
        if not self._enabled or not trainer.is_global_zero or not total or total == float("inf"):
            return
        percent = 100 * (batch_idx + 1) / total
        if percent < self._next_percent or percent >= 100:
            return
        self._next_percent = (int(percent) // self.every_percent + 1) * self.every_percent
        now = time.monotonic()
        if now - self._last_line < self.min_interval_s:
            return
        self._last_line = now
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f", train/loss {float(loss):.4f}" if loss is not None else ""
        log.info(
            f"{self._epoch(trainer)}: {percent:.0f}% ({batch_idx + 1}/{int(total)} steps){loss_text}, "
            f"{now - self._epoch_start:.0f}s"
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/acc")}
        shown |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and "/acc" in k}
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
        log.info(
            f"{self._epoch(trainer)} done in {time.monotonic() - self._epoch_start:.1f}s "
            f"(step {trainer.global_step}){': ' + metrics if metrics else ''}"
        )


def progress_bar(enabled: bool = True, lines: bool | str = "auto", every_percent: int = 10) -> ProgressBar | None:
    """The run's progress display: ``None`` when ``trainer.enable_progress_bar`` is off; with ``lines=auto``
    Lightning's default bar (rich, else tqdm) on a terminal and :class:`ProgressLines` otherwise;
    ``lines=true`` / ``false`` force one."""
    if lines not in ("auto", True, False):
        raise ValueError(f"callbacks.progress.lines={lines!r}; choose auto, true or false")
    if not enabled:
        return None
    if lines is True or (lines == "auto" and not sys.stderr.isatty()):
        return ProgressLines(every_percent=every_percent)
    return RichProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()  # Lightning's own default


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP)


def quiet_lightning() -> None:
    """Silence Lightning's advertisements, the torch deprecation warning its own code triggers, and its
    ``srun`` hint (wrong for this platform, whose SLURM jobs the launcher submits)."""
    # rank_zero_info logs to the logger the last imported of these modules set (lightning_utilities' rank_zero.log)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
    warnings.filterwarnings("ignore", message=SRUN_HINT)
