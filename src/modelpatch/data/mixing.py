"""Task mixing: one class per ``task.mixing`` mode, owning both which task(s) a training step trains and
which batches are loaded for it.

``all`` trains every task each step (weighted losses summed); ``round_robin`` and ``proportional`` train
one task per step, in turn or drawn by dataset size (seeded by step, so every rank draws the same);
``per_device`` trains task ``r`` on rank ``r``. Today every mode loads a batch of every task per step
(``Mixing.train_loader``); a mode that trains one task may load only that task's batch by overriding it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader


def tasks_per_rank(tasks: Sequence[str], world_size: int) -> list[str]:
    """``per_device`` mixing: rank ``r`` trains ``tasks[r % K]`` (the paper's one task per device)."""
    if world_size < len(tasks):
        raise ValueError(
            f"mixing=per_device trains one task per device and needs trainer.devices >= {len(tasks)} "
            f"(one per task: {', '.join(tasks)}); got {world_size}. Use mixing=all or round_robin."
        )
    return [tasks[r % len(tasks)] for r in range(world_size)]


class Mixing:
    """A mixing mode. This base trains every task it is given; subclasses choose among them.

    Args:
        seed: seeds the draws of ``proportional`` (with the step).
    """

    name = ""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def train_loader(self, loaders: Mapping[str, DataLoader]) -> CombinedLoader:
        """What the training steps get: ``{task: (images, labels)}`` per step, a batch of every task; the
        largest task sets the epoch and the smaller ones cycle."""
        return CombinedLoader(dict(loaders), mode="max_size_cycle")

    def tasks_for_step(
        self, tasks: Sequence[str], *, step: int, rank: int, world_size: int, sizes: Mapping[str, int]
    ) -> list[str]:
        """Which of ``tasks`` (trainable, in the step's batch) this step trains.

        Args:
            step: the optimizer step; rank, world_size: this process among the trainer's.
            sizes: training samples per task.
        """
        if len(tasks) <= 1:
            return list(tasks)
        return self.choose(list(tasks), step=step, rank=rank, world_size=world_size, sizes=sizes)

    def choose(self, tasks: list[str], *, step: int, rank: int, world_size: int, sizes: Mapping[str, int]) -> list[str]:
        return tasks

    def rank_tasks(self, tasks: Sequence[str], world_size: int) -> list[str] | None:
        """The task each rank trains, where ranks train different tasks; ``None`` where every rank
        trains the same ones."""
        return None

    def loss_scale(self, task: str, tasks: Sequence[str], world_size: int) -> float:
        """The factor of ``task``'s loss (DDP averages gradients over all ranks)."""
        return 1.0


class AllTasks(Mixing):
    """``all``: every step trains every task."""

    name = "all"


class RoundRobin(Mixing):
    """``round_robin``: step ``s`` trains task ``s mod K``."""

    name = "round_robin"

    def choose(self, tasks, *, step, rank, world_size, sizes):
        return [tasks[step % len(tasks)]]


class Proportional(Mixing):
    """``proportional``: each step trains one task drawn by training-set size, seeded by (seed, step)."""

    name = "proportional"

    def choose(self, tasks, *, step, rank, world_size, sizes):
        weights = torch.tensor([max(1, sizes.get(t, 0)) for t in tasks], dtype=torch.float)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return [tasks[int(torch.multinomial(weights, 1, generator=gen))]]


class PerDevice(Mixing):
    """``per_device``: rank ``r`` trains ``tasks[r % K]``; its loss is scaled so that DDP's averaging over
    all ranks does not dilute the gradient of its patch."""

    name = "per_device"

    def choose(self, tasks, *, step, rank, world_size, sizes):
        return [tasks_per_rank(tasks, world_size)[rank]]

    def rank_tasks(self, tasks, world_size):
        return tasks_per_rank(list(tasks), world_size)

    def loss_scale(self, task, tasks, world_size):
        """A task trained on n of W ranks is scaled by W/n: its patch and head get the mean gradient
        of the ranks that saw it, undiluted."""
        if world_size == 1:
            return 1.0
        return world_size / tasks_per_rank(list(tasks), world_size).count(task)


MIXING: dict[str, type[Mixing]] = {m.name: m for m in (AllTasks, RoundRobin, Proportional, PerDevice)}


def make_mixing(mode: str, *, seed: int = 0) -> Mixing:
    """The ``task.mixing`` mode by name; an unknown one is an error listing the valid ones."""
    if mode not in MIXING:
        raise ValueError(f"task mixing {mode!r} is unknown; choose one of {', '.join(MIXING)}")
    return MIXING[mode](seed=seed)
