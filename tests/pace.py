"""A callback the requeue tests add from the command line: slows each training step down, so that a
test can interrupt a run between its first checkpoint and its end, and records the global step each
attempt starts training at (``<out>/starts.txt``, one line per attempt)."""

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class Pace(Callback):
    def __init__(self, seconds_per_step: float, out: str):
        self.seconds_per_step = seconds_per_step
        self.out = Path(out)

    def on_train_start(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "starts.txt", "a") as f:
            f.write(f"{trainer.global_step}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds_per_step)
