"""A callback the fault tests add from the command line: ``train.py`` kills itself (SIGKILL, nothing runs after
it: no ``finally``, no flush, no atexit) at a point the test chooses, once per run folder.

``at``:
- ``step``: when training step ``step`` (counting from 0) is about to start, i.e. after ``step`` steps;
- ``validation``: inside the first validation of training that comes after ``step`` steps;
- ``epoch_start``: when epoch ``step`` starts (after the previous epoch's validation and checkpoints);
- ``checkpoint_write``: while ``file`` is being written after ``step`` steps, half of its bytes on disk;
- ``between_tasks``: inside training step ``step``, after the first task's forward pass, before the next
  task's (a ``task=multi`` step trains several);
- ``test``: inside the test of the best checkpoint, after training (``step`` unused).

``marker`` records that the kill happened, so that the restarted run (the same command) goes on.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(Callback):
    def __init__(self, at: str, step: int, marker: str, file: str = "last.ckpt"):
        if at not in ("step", "validation", "epoch_start", "checkpoint_write", "between_tasks", "test"):
            raise ValueError(f"KillAt: unknown point {at!r}")
        self.at, self.step, self.file = at, step, file
        self.marker = Path(marker)
        self.armed = not self.marker.exists()

    def state_dict(self):
        return {}  # nothing of the test in the checkpoint the run resumes from

    def _kill(self) -> None:
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"{self.at} {self.step}\n")
        die()

    def setup(self, trainer, pl_module, stage):
        if not self.armed or stage != "fit":
            return
        if self.at == "checkpoint_write":
            trainer.strategy.checkpoint_io = HalfWrite(trainer.strategy.checkpoint_io, self)
        if self.at == "between_tasks":
            first = pl_module.trainable_tasks[0]
            pl_module.heads[first].register_forward_hook(lambda *_: self._between_tasks(pl_module))

    def _between_tasks(self, pl_module) -> None:
        if pl_module.training and pl_module.trainer.global_step == self.step:
            self._kill()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.armed and self.at == "step" and trainer.global_step == self.step:
            self._kill()

    def on_train_epoch_start(self, trainer, pl_module):
        if self.armed and self.at == "epoch_start" and trainer.current_epoch == self.step:
            self._kill()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.armed and self.at == "validation" and not trainer.sanity_checking and trainer.global_step >= self.step:
            self._kill()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.armed and self.at == "test":
            self._kill()


class HalfWrite:
    """Wraps the trainer's checkpoint writer: the write of ``file`` after ``step`` steps stops halfway (the
    bytes written so far stay where the writer put them) and the process dies."""

    def __init__(self, inner, killer: KillAt):
        self.inner, self.killer = inner, killer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        trainer_step = checkpoint.get("global_step")
        if Path(path).name != self.killer.file or trainer_step < self.killer.step:
            return self.inner.save_checkpoint(checkpoint, path, storage_options)
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if isinstance(f, (str, os.PathLike)):  # a writer that saves straight to a file: half of it, then die
                with open(f, "r+b") as fh:
                    fh.truncate(os.path.getsize(f) // 2)
                self.killer._kill()
            f.truncate(f.tell() // 2)  # one that saves to memory first: its file gets half the bytes
            f.seek(0, os.SEEK_END)

        torch.save = half_save
        try:
            self.inner.save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = real_save
        self.killer._kill()
