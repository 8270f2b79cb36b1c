"""The training loader: per step, this rank's batch of each task the step trains (``{task: (images,
labels)}``), and nothing else; which tasks, and what an epoch is, the mixing mode says (``data.mixing``);
``describe_steps``, the line every run prints about them.

``StepSampler`` yields each step's indices (``{task: [i, ...]}``, a ``Step``) and ``StepDataset`` loads them. A
run resumed mid-epoch continues the same (seeded) order: a checkpoint records the epoch and the steps done
in it (``TaskDataModule.state_dict``), and the restarted sampler skips those (``StepSampler.resume``). What a
step draws while loading (augmentation) comes from generators seeded by the step (``Step.seed``), the same in
the main process or any worker, resumed or not.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate

from modelpatch.data.mixing import Mixing


def derived_seed(*key: int) -> int:
    """A 63-bit seed mixed from whole numbers (numpy's ``SeedSequence``): nearby keys give unrelated streams."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _generator(seed: int, epoch: int, task: str, repeat: int) -> torch.Generator:
    key = [seed, epoch, zlib.crc32(task.encode()), repeat]  # by name: the same order in any mix of tasks
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))


class Step(dict):
    """One step's indices, ``{task: [i, ...]}``, with the seed of what loading them draws (``seed``)."""

    def __init__(self, indices: Mapping[str, list[int]], seed: int):
        super().__init__(indices)
        self.seed = seed

    def __reduce__(self):  # to a DataLoader worker, seed included
        return Step, (dict(self), self.seed)


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every CUDA device's) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Python's, numpy's and torch's CPU generators seeded by ``seed`` inside, as they were after."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_all(seed)
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


class StepSampler(DistributedSampler):
    """Each step's indices on one rank: ``{task: [sample indices]}`` for the tasks the step trains.

    A ``DistributedSampler`` so that Lightning keeps it rather than putting its own over the data: it
    splits each task's data over the ranks that train it (``Mixing.ranks_of``) itself. Task ``t``'s order
    in an epoch is a permutation seeded by (seed, epoch, t's name), whatever the ranks and other tasks:
    rank ``j`` of ``w`` takes items ``j, j + w, ...``, so the first batches of ``w`` ranks at batch size
    ``B / w`` hold the same samples as the first batch of one process at batch size ``B``.

    Args:
        sizes: training samples per task, in task order.
        mixing: the mode (schedule and sharding).
        batch_size: per rank, task and step.
        num_replicas, rank: this process among the trainer's.
    """

    def __init__(self, sizes: Mapping[str, int], mixing: Mixing, batch_size: int, *, num_replicas: int = 1,
                 rank: int = 0):  # fmt: skip
        empty = [t for t, n in sizes.items() if n == 0]
        if empty:
            raise ValueError(f"no training samples in task(s) {', '.join(empty)}: check their train_size")
        # not DistributedSampler.__init__: it wants one dataset and a process group
        self.sizes, self.mixing, self.batch_size = dict(sizes), mixing, batch_size
        self.tasks = list(sizes)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, mixing.seed
        self.epoch, self.shuffle, self.drop_last = 0, True, False
        self._resume: tuple[int, int] | None = None
        self.groups = {t: mixing.ranks_of(t, self.tasks, num_replicas) for t in self.tasks}
        self.batches = {t: _num_batches(math.ceil(self.sizes[t] / len(self.groups[t])), batch_size) for t in self.tasks}

    def schedule(self, epoch: int) -> list[tuple[str, ...]]:
        return self.mixing.schedule(self.batches, epoch=epoch, rank=self.rank, world_size=self.num_replicas)

    def __len__(self) -> int:
        return len(self.schedule(self.epoch))

    def resume(self, epoch: int, steps_done: int, epoch_steps: int) -> None:
        """Continue ``epoch`` after its first ``steps_done`` steps (the next epoch if it was finished)."""
        if steps_done >= epoch_steps:
            epoch, steps_done = epoch + 1, 0
        self.epoch = epoch
        self._resume = (epoch, steps_done)

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None  # past the resumed epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[Step]:
        # every iteration of the resumed epoch skips (a DataLoader with workers iterates its sampler twice)
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        return itertools.islice(self._steps(self.epoch), skip, None)

    def _steps(self, epoch: int) -> Iterator[Step]:
        streams = {t: self._task_batches(t, epoch) for t in self.tasks if self.rank in self.groups[t]}
        for number, tasks in enumerate(self.schedule(epoch)):
            yield Step({t: next(streams[t]) for t in tasks}, derived_seed(self.seed, epoch, number, self.rank, 1))

    def _task_batches(self, task: str, epoch: int) -> Iterator[list[int]]:
        """This rank's batches of ``task``: its share of a fresh permutation on each pass over the data."""
        n, group = self.sizes[task], self.groups[task]
        w, j = len(group), group.index(self.rank)
        for repeat in itertools.count():
            order = torch.randperm(n, generator=_generator(self.seed, epoch, task, repeat))
            padded = math.ceil(n / w) * w
            order = torch.cat([order, order[: padded - n]]) if padded > n else order
            share = order[j::w].tolist()
            for b in range(_num_batches(len(share), self.batch_size)):
                yield share[b * self.batch_size : (b + 1) * self.batch_size]


def _num_batches(n: int, batch_size: int) -> int:
    """Batches an epoch makes of ``n`` samples: a last batch of under half a batch (or of one sample) is left
    out, a different one each epoch (the order is shuffled), so that no batch exceeds ``batch_size``.

    A step of its own on a few samples normalizes them by their own statistics, and its gradient counts as
    much as a full batch's: with 5,000 images at batch 128, the 8 left made each epoch's last step a loss
    spike that derailed patch training (docs/results.md#recipes). One sample cannot train BatchNorm.
    """
    full, rest = divmod(n, batch_size)
    return full if full and rest and (rest == 1 or 2 * rest < batch_size) else math.ceil(n / batch_size)


class StepDataset(Dataset):
    """Loads a step's indices ``{task: [i, ...]}`` as ``{task: (images, labels)}``: a whole batch at once
    where the task's dataset can (``__getitems__``), else item by item, collated."""

    def __init__(self, datasets: Mapping[str, Dataset]):
        self.datasets = dict(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())

    def __getitem__(self, step: Mapping[str, Sequence[int]]):
        with seeded(step.seed) if isinstance(step, Step) else contextlib.nullcontext():
            return {task: _load(self.datasets[task], indices) for task, indices in step.items()}


def _load(dataset: Dataset, indices: Sequence[int]):
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(list(indices))
    return default_collate([dataset[i] for i in indices])


def steps_per_epoch(sizes: Mapping[str, int], mixing: Mixing, batch_size: int, world_size: int) -> int:
    """Training steps (batches of a rank) in one epoch of tasks of ``sizes`` training samples."""
    return len(StepSampler(sizes, mixing, batch_size, num_replicas=world_size, rank=0))


def describe_steps(sizes: Mapping[str, int], mixing: Mixing, batch_size: int, world_size: int) -> str:
    """The line every run prints: ranks, global batch per task and step, steps per epoch."""
    sampler = StepSampler(sizes, mixing, batch_size, num_replicas=world_size, rank=0)
    globals_ = {t: batch_size * len(sampler.groups[t]) for t in sizes}
    per_task = ", ".join(f"{t} {b}" for t, b in globals_.items())
    batch = str(next(iter(globals_.values()))) if len(set(globals_.values())) == 1 else f"({per_task})"
    return (
        f"data: {world_size} rank(s) x batch {batch_size} per task and step = global batch {batch}; "
        f"{len(sampler)} steps per epoch (task.mixing={mixing.name}; docs/clusters.md: scaling the learning rate)"
    )
