"""Lightning callbacks the benchmarks use to time epochs and the first training step."""

from __future__ import annotations

import atexit
import json
import os
import time

import lightning as L
import torch


def _sync(module: L.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class EpochTimer(L.Callback):
    """Wall seconds of every training epoch: ``on_train_epoch_start`` to ``on_train_epoch_end``."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.steps: list[int] = []
        self._start = 0.0
        self._step0 = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module)
        self._start = time.perf_counter()
        self._step0 = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module)
        self.epochs.append(time.perf_counter() - self._start)
        self.steps.append(trainer.global_step - self._step0)


class FirstStepProbe(L.Callback):
    """Writes wall-clock times (``time.time()``) of fit start, of the first training batch's start
    and end, of fit end, and of this probe's ``atexit`` handler (run before the interpreter tears
    down its modules) to the JSON file named by ``$BENCH_PROBE_OUT`` (used by ``bench/startup.py``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        atexit.register(self._mark, "atexit")

    def _mark(self, key: str) -> None:
        if key not in self.times:
            self.times[key] = time.time()
            path = os.environ.get("BENCH_PROBE_OUT")
            if path:
                with open(path, "w") as f:
                    json.dump(self.times, f)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("fit_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._mark("first_batch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._mark("first_batch_end")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("fit_end")
