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
        batch_size: per task and step.
        num_workers: DataLoader workers (0 keeps everything in the main process); tasks streamed
            from disk decode and transform their images in them.
        eval_batch_size: for validation and test; defaults to ``batch_size``.
        train_tasks: the tasks that get training batches (default: all); the others are only
            validated and tested (tasks kept frozen from a loaded checkpoint).
        mixing: the task-mixing mode, which makes the training loader (default: ``all``).
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
        self.features_cached = False  # set by data.features.cache_features

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

    def _loader(self, split: Split | StreamSplit, *, train: bool, augment: bool = False) -> DataLoader:
        """In-memory splits are sliced a batch at a time (``augment``: ``augment_batch``); streamed
        splits are ordinary datasets (their transform augments) with the default collation, and
        their evaluation workers end after each pass (a mix of tasks would otherwise keep
        ``num_workers`` idle processes per task and split)."""
        in_memory = isinstance(split, Split)
        if in_memory:
            dataset, collate = InMemoryDataset(split, augment=train and augment), _as_batch
        else:
            dataset, collate = split, None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and self._last_batch_of_one(len(dataset)),
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0 and (train or in_memory),
        )

    def _last_batch_of_one(self, samples: int) -> bool:
        """Whether a rank's training epoch would end in a batch of one image, which BatchNorm cannot
        train on (``Expected more than 1 value per channel``): such a batch is dropped."""
        world = self.trainer.world_size if self.trainer is not None else 1
        per_rank = -(-samples // world)  # DistributedSampler pads every rank to the same count
        return per_rank > 1 and per_rank % self.batch_size == 1

    def train_dataloader(self):
        loaders = {
            n: self._loader(self.data[n].train, train=True, augment=self.data[n].spec.augment) for n in self.train_tasks
        }
        return self.mixing.train_loader(loaders)

    def val_dataloader(self):
        return [self._loader(self.data[n].val, train=False) for n in self.task_names]

    def test_dataloader(self):
        return [self._loader(self.data[n].test, train=False) for n in self.task_names]
