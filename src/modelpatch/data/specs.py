"""Task specs: what a task is (dataset, classes, input size, split recipe), the catalog of a mix, and
the splits every loader returns (``TaskData``: in memory, ``Split``, or streamed from disk, ``StreamSplit``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset


class DatasetMissingError(FileNotFoundError):
    """A dataset is not on disk and cannot be fetched."""


class TaskError(ValueError):
    """A task or task mix is misconfigured."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


class StreamSplit(Dataset):
    """A split read from disk: item ``i`` is ``(transform(image), labels[i])`` where the image is
    ``source[indices[i]]`` (a torchvision dataset without transforms, giving PIL images).

    ``labels`` are the task's labels (class subset relabelled ``0..k-1``), known without decoding
    any image.
    """

    def __init__(self, source: Dataset, indices: torch.Tensor, labels: torch.Tensor, transform: Callable):
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        self.source = source
        self.indices = indices
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, _ = self.source[int(self.indices[i])]
        return self.transform(image), int(self.labels[i])


@dataclass
class TaskSpec:
    """What a task is. Built from a ``conf/task/*.yaml`` entry by ``task_specs``.

    Args:
        val_size: images held out (seeded) from the training split for validation; unused where the
            dataset has an official validation split (Flowers102, FGVC Aircraft, DTD, an image folder
            with both ``val/`` and ``test/``), and may then be ``None``.
        options: data options (``download``, system folders), from the ``data`` config.
        augment: random training augmentation: random resized crop + horizontal flip for datasets on
            disk, random crop (zero padding of 1/8 of the side) + horizontal flip for in-memory ones.
        path: the folder of an ``imagefolder`` task (``train/``, ``val/`` and/or ``test/`` holding one
            folder per class); absolute, or relative to ``data.root``.
        dataset_args: extra arguments of the torchvision dataset class, where a dataset has them:
            ``annotation_level`` (fgvc_aircraft), ``partition`` (dtd), ``small`` (places365).
    """

    name: str
    dataset: str
    input_size: int
    classes: list[int] | None = None
    train_size: int | None = None
    val_size: int | None = 1000
    split_seed: int = 0
    loss_weight: float = 1.0
    options: dict = field(default_factory=dict)
    augment: bool = False
    path: str | None = None
    dataset_args: dict | None = None


@dataclass
class TaskData:
    """A task's three splits and its class names: in memory (``Split``) for the embedded datasets,
    streamed from disk (``StreamSplit``) for the others. Both have ``labels`` (int64 ``[N]``)."""

    spec: TaskSpec
    class_names: list[str]
    train: Split | StreamSplit
    val: Split | StreamSplit
    test: Split | StreamSplit

    @property
    def streams(self) -> bool:
        return not isinstance(self.train, Split)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def check_task_names(names: Sequence[str]) -> None:
    """Task names become module and metric keys: no dots, no clash with module attributes."""
    if not names:
        raise TaskError("the task mix is empty; list at least one task")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise TaskError(f"task(s) listed more than once: {', '.join(dupes)}")
    for name in names:
        if not name or "." in name or hasattr(nn.ModuleDict(), name):
            raise TaskError(
                f"task name {name!r} cannot be used: names must be non-empty, without '.', and "
                "not an attribute of torch modules (such as 'train' or 'eval')"
            )


def check_sizes(spec: TaskSpec) -> None:
    """``train_size`` and ``val_size`` that no split can have, before any data is read."""
    if spec.train_size is not None and spec.train_size < 2:
        raise TaskError(
            f"task {spec.name!r}: train_size={spec.train_size}; set task.train_size to at least 2 images "
            "(a training batch needs 2 for BatchNorm), or null for the whole training split"
        )
    if spec.val_size is not None and spec.val_size < 0:
        raise TaskError(f"task {spec.name!r}: val_size={spec.val_size}; set task.val_size >= 0")


def check_classes(spec: TaskSpec, names: list[str]) -> None:
    bad = [c for c in spec.classes if not 0 <= c < len(names)]
    if bad:
        raise TaskError(f"task {spec.name!r}: classes {bad} outside 0..{len(names) - 1} of {spec.dataset}")


def split_indices(spec: TaskSpec, n: int, *, hold_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) positions in a training split of ``n``: ``val_size`` held out if
    ``hold_out``, then the first ``train_size`` of the rest."""
    gen = torch.Generator().manual_seed(spec.split_seed)
    order = torch.randperm(n, generator=gen)
    val_size = 0
    if hold_out:
        if spec.val_size is None:
            raise TaskError(f"task {spec.name!r}: {spec.dataset} has no validation split of its own; set val_size")
        if spec.val_size >= len(order):
            raise TaskError(
                f"task {spec.name!r}: val_size {spec.val_size} leaves no training data ({len(order)} images)"
            )
        val_size = spec.val_size
    val_idx, train_idx = order[:val_size], order[val_size:]
    if spec.train_size is not None:
        if spec.train_size > len(train_idx):
            raise TaskError(f"task {spec.name!r}: train_size {spec.train_size} > {len(train_idx)} available")
        train_idx = train_idx[: spec.train_size]
    return train_idx, val_idx


TASK_FIELDS = (
    "name",
    "dataset",
    "input_size",
    "classes",
    "train_size",
    "val_size",
    "split_seed",
    "loss_weight",
    "augment",
    "path",
    "dataset_args",
)


def task_specs(task_cfg: dict, data_cfg: dict | None = None) -> list[TaskSpec]:
    """Turn the ``task`` config (one task, or a mix with ``tasks`` + ``catalog``) into specs.

    Args:
        task_cfg: a ``conf/task/*.yaml`` node as a plain dict.
        data_cfg: the ``data`` node; supplies dataset options (download, system folders).
    """
    data_cfg = data_cfg or {}
    options = {"download": data_cfg.get("download", False)}
    if data_cfg.get("fashion_mnist_dir"):
        options["system_dir"] = data_cfg["fashion_mnist_dir"]
    if "tasks" in task_cfg:
        names = list(task_cfg["tasks"] or [])
        check_task_names(names)
        catalog = task_cfg.get("catalog") or {}
        unknown = [n for n in names if n not in catalog]
        if unknown:
            raise TaskError(
                f"unknown task(s) in the mix: {', '.join(unknown)}; known tasks: {', '.join(sorted(catalog))}"
            )
        entries = [catalog[n] for n in names]
    else:
        entries = [task_cfg]
    specs = []
    for entry in entries:
        missing = [f for f in ("name", "dataset", "input_size") if entry.get(f) is None]
        if missing:
            raise TaskError(f"task config {entry.get('name', entry)!r} lacks {', '.join(missing)}")
        specs.append(TaskSpec(**{k: entry[k] for k in TASK_FIELDS if k in entry}, options=dict(options)))
        check_sizes(specs[-1])
    check_task_names([s.name for s in specs])
    return specs
