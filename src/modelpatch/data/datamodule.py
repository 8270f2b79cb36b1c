"""The LightningDataModule: one task or a mix, loaded once, served as per-step batches and per-task
evaluation loaders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from modelpatch.data.disk import DISK_DATASETS, StreamSplit, load_from_disk
from modelpatch.data.embedded import DATASETS, InMemoryDataset, load_embedded
from modelpatch.data.mixing import AllTasks, Mixing
from modelpatch.data.specs import Split, TaskData, TaskError, TaskSpec, check_task_names
from modelpatch.data.steps import StepDataset, StepSampler


def load_task(spec: TaskSpec, root: str | Path) -> TaskData:
    """Read, filter, resize and split a task's data (in memory), or index it on disk (streamed)."""
    if spec.dataset in DISK_DATASETS:
        return load_from_disk(spec, Path(root))
    if spec.dataset not in DATASETS:
        known = sorted([*DATASETS, *DISK_DATASETS])
        raise TaskError(f"task {spec.name!r}: unknown dataset {spec.dataset!r}; datasets: {', '.join(known)}")
    return load_embedded(spec, Path(root))


def _as_batch(batch):
    return batch


class TaskDataModule(L.LightningDataModule):
    """Serves one task or a mix: training batches are ``{task: (images, labels)}``; validation
    and test have one dataloader per task, in task order.

    Args:
        specs: the tasks.
        root: folder for datasets (and the extracted copy of Fashion-MNIST).
        batch_size: per task, step and rank (the global batch is ``batch_size`` times the ranks that
            train the task).
        num_workers: DataLoader workers (0 keeps everything in the main process); tasks streamed
            from disk decode and transform their images in them.
        eval_batch_size: for validation and test; defaults to ``batch_size``.
        train_tasks: the tasks that get training batches (default: all); the others are only
            validated and tested (tasks kept frozen from a loaded checkpoint).
        mixing: the task-mixing mode: which tasks' batches each step loads (default: ``all``).
    """

    def __init__(
        self,
        specs: Sequence[TaskSpec],
        *,
        root: str | Path,
        batch_size: int = 128,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        train_tasks: Sequence[str] | None = None,
        mixing: Mixing | None = None,
    ):
        super().__init__()
        check_task_names([s.name for s in specs])
        self.specs = list(specs)
        self.train_tasks = list(train_tasks) if train_tasks is not None else [s.name for s in specs]
        self.root = Path(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.mixing = mixing or AllTasks()
        self.data: dict[str, TaskData] = {}
        self.features_cached = False  # set by training.features.cache_features
        self._sampler: StepSampler | None = None
        self._resume: dict[str, int] | None = None  # from a checkpoint, for the next train_dataloader()

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def prepare_data(self) -> None:
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        for spec in self.specs:
            if spec.name not in self.data:
                self.data[spec.name] = load_task(spec, self.root)

    @property
    def cacheable(self) -> bool:
        """Every task is in memory and not augmented: cached backbone features would be exact."""
        return all(s.dataset not in DISK_DATASETS and not s.augment for s in self.specs)

    def _eval_loader(self, split: Split | StreamSplit) -> DataLoader:
        """Validation and test: in-memory splits are sliced a batch at a time; streamed splits are ordinary
        datasets with the default collation, and their workers end after each pass (a mix of tasks would
        otherwise keep ``num_workers`` idle processes per task and split). Training: ``train_dataloader``."""
        in_memory = isinstance(split, Split)
        dataset, collate = (InMemoryDataset(split), _as_batch) if in_memory else (split, None)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0 and in_memory,
        )

    def train_dataloader(self) -> DataLoader:
        """Per step, this rank's batch of each task the step trains, and only those (``data.steps``)."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        datasets = {}
        for n in self.train_tasks:
            split, augment = self.data[n].train, self.data[n].spec.augment
            datasets[n] = InMemoryDataset(split, augment=augment) if isinstance(split, Split) else split
        sizes = {n: len(d) for n, d in datasets.items()}
        self._sampler = StepSampler(sizes, self.mixing, self.batch_size, num_replicas=world, rank=rank)
        if self._resume:
            self._sampler.resume(**self._resume)
            self._resume = None
        return DataLoader(
            StepDataset(datasets),
            sampler=self._sampler,  # a DistributedSampler: Lightning keeps it
            batch_size=None,  # the sampler yields whole steps
            collate_fn=_as_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict[str, int]:
        """Where training is in its epoch (saved in every checkpoint), so that a run resumed mid-epoch
        continues the same order rather than starting the epoch over."""
        if self._sampler is None or self.trainer is None:
            return {}
        trainer = self.trainer
        return {
            "epoch": self._sampler.epoch,
            "steps_done": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed),
            "epoch_steps": int(trainer.num_training_batches),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state) or None

    def val_dataloader(self):
        return [self._eval_loader(self.data[n].val) for n in self.task_names]

    def test_dataloader(self):
        return [self._eval_loader(self.data[n].test) for n in self.task_names]
