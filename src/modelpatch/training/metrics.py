"""Our own metrics: per-task accuracy averaged over tasks, and per-task training statistics, each one metric for
all tasks (one sync per epoch, not one per task)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class TaskMeanAccuracy(Metric):
    """Accuracy of each task, averaged over tasks (the number a sweeper optimizes).

    Own metric: torchmetrics' ``MultitaskWrapper`` needs every task's predictions in one update, and here
    each evaluation batch is one task's; tasks without a batch must not count.
    """

    full_state_update = False

    def __init__(self, num_tasks: int):
        super().__init__()
        self.add_state("correct", torch.zeros(num_tasks), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_tasks), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, task_index: int) -> None:
        self.correct[task_index] += (preds == target).sum()
        self.total[task_index] += target.numel()

    def compute(self) -> torch.Tensor:
        seen = self.total > 0
        return (self.correct[seen] / self.total[seen]).mean()


class TaskTrainStats(Metric):
    """Each task's mean training loss and accuracy over an epoch, summed across ranks.

    One metric for all tasks, logged once per epoch: logging per step costs about 0.7 ms of
    Lightning bookkeeping per value, as much as a cached-feature step itself. Own metric: a
    ``MeanMetric`` and an accuracy per task would cost 2K syncs per epoch where this is one.
    """

    full_state_update = False

    def __init__(self, num_tasks: int):
        super().__init__()
        for name in ("loss_sum", "correct", "total"):
            self.add_state(name, torch.zeros(num_tasks), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, preds: torch.Tensor, target: torch.Tensor, task_index: int) -> None:
        self.loss_sum[task_index] += loss.detach() * target.numel()
        self.correct[task_index] += (preds == target).sum()
        self.total[task_index] += target.numel()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss, accuracy, samples) per task; tasks not seen have 0 samples."""
        seen = self.total.clamp(min=1)
        return self.loss_sum / seen, self.correct / seen, self.total
