"""Task mixing: one class per ``task.mixing`` mode, owning which task(s) each training step trains, and so
which batches are loaded for it (``data.steps.StepSampler`` loads only those), what an epoch is, and what
data-parallel training (DDP) needs of the mode.

A task's training set is shuffled each epoch and split over the ranks that train it (a disjoint share
each, padded to equal length as torch's ``DistributedSampler`` does); a rank's share is cut into batches of
``data.batch_size``. With ``b_t`` such batches of task ``t`` per rank, an epoch is:

- ``all``: ``max b_t`` steps, each loading and training a batch of every task;
- ``round_robin``: ``K * max b_t`` steps, step ``s`` loading and training task ``s mod K`` only;
- ``proportional``: ``sum b_t`` steps, each loading and training one task, in a seeded random order in
  which task ``t`` has ``b_t`` steps (so tasks are drawn in proportion to their sizes);
- ``per_device``: ``max`` over ranks of that rank's batches; rank ``r`` loads and trains only task
  ``tasks[r % K]``, whose data is split only over the ranks that train it.

In every mode each task sees all of its training data (its share on each rank) once per epoch; the
largest task exactly once, a smaller one cycles (reshuffled) where the mode gives it more steps than it
has batches (``all``, ``round_robin``, ``per_device``). Every rank takes the same steps, in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def tasks_per_rank(tasks: Sequence[str], world_size: int) -> list[str]:
    """``per_device`` mixing: rank ``r`` trains ``tasks[r % K]`` (the paper's one task per device)."""
    if world_size < len(tasks):
        raise ValueError(
            f"mixing=per_device trains one task per device and needs trainer.devices >= {len(tasks)} "
            f"(one per task: {', '.join(tasks)}); got {world_size}. Use mixing=all or round_robin."
        )
    return [tasks[r % len(tasks)] for r in range(world_size)]


class Mixing:
    """A mixing mode. This base trains every task at every step (``all``).

    Args:
        seed: seeds the shuffles of each epoch (and the order of ``proportional``).
    """

    name = ""
    #: some trainable parameters get no gradient on a step (another task's patch and head): DDP
    #: must be told (``find_unused_parameters``)
    leaves_parameters_unused = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def ranks_of(self, task: str, tasks: Sequence[str], world_size: int) -> list[int]:
        """The ranks that train ``task`` (its training set is split over them)."""
        return list(range(world_size))

    def rank_tasks(self, tasks: Sequence[str], world_size: int) -> list[str] | None:
        """The task each rank trains, where ranks train different tasks; ``None`` where every rank
        trains the same ones."""
        return None

    def schedule(self, batches: Mapping[str, int], *, epoch: int, rank: int, world_size: int) -> list[tuple[str, ...]]:
        """The tasks each step of ``epoch`` loads and trains on ``rank``.

        Args:
            batches: each task's batches per rank and epoch, in task order.
        """
        return [tuple(batches)] * max(batches.values(), default=0)

    def loss_scale(self, task: str, tasks: Sequence[str], world_size: int) -> float:
        """The factor of ``task``'s loss (DDP averages gradients over all ranks)."""
        return 1.0


class AllTasks(Mixing):
    """``all``: every step trains every task."""

    name = "all"
    leaves_parameters_unused = False


class RoundRobin(Mixing):
    """``round_robin``: step ``s`` trains task ``s mod K``; every task gets ``max b_t`` steps an epoch."""

    name = "round_robin"

    def schedule(self, batches, *, epoch, rank, world_size):
        tasks = list(batches)
        return [(tasks[s % len(tasks)],) for s in range(len(tasks) * max(batches.values(), default=0))]


class Proportional(Mixing):
    """``proportional``: each step trains one task; an epoch holds each task's batches once, in a random order
    seeded by (seed, epoch), the same on every rank."""

    name = "proportional"

    def schedule(self, batches, *, epoch, rank, world_size):
        steps = [(t,) for t, n in batches.items() for _ in range(n)]
        order = torch.randperm(len(steps), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return [steps[i] for i in order.tolist()]


class PerDevice(Mixing):
    """``per_device``: rank ``r`` trains ``tasks[r % K]`` on all of that task's data (split over the ranks
    that share it); its loss is scaled so that DDP's averaging over all ranks does not dilute the
    gradient of its patch."""

    name = "per_device"

    def ranks_of(self, task, tasks, world_size):
        return [r for r, t in enumerate(tasks_per_rank(list(tasks), world_size)) if t == task]

    def rank_tasks(self, tasks, world_size):
        return tasks_per_rank(list(tasks), world_size)

    def schedule(self, batches, *, epoch, rank, world_size):
        own = tasks_per_rank(list(batches), world_size)[rank]
        return [(own,)] * max(batches.values(), default=0)

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
