"""Tasks and their data: a task is a dataset, a class subset, an input size and a split recipe.

Images are decoded once, resized to the task's input size and held in memory as ``uint8``
tensors ``[N, C, H, W]``; batches are sliced from them, so a CPU epoch is not data-bound. The
model converts to float and normalizes (``PatchModule.forward``), so served images need the same
``uint8`` layout or ``[0, 1]`` floats.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DatasetMissingError(FileNotFoundError):
    """A dataset is not on disk and cannot be fetched."""


class TaskError(ValueError):
    """A task or task mix is misconfigured."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]


@dataclass
class TaskSpec:
    """What a task is. Built from a ``conf/task/*.yaml`` entry by ``task_spec``."""

    name: str
    dataset: str
    input_size: int
    classes: list[int] | None = None
    train_size: int | None = None
    val_size: int = 1000
    split_seed: int = 0
    loss_weight: float = 1.0
    options: dict = field(default_factory=dict)


@dataclass
class TaskData:
    """A task's three in-memory splits and its class names."""

    spec: TaskSpec
    class_names: list[str]
    train: Split
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --- dataset readers: (root, train, options) -> (uint8 [N, C, H, W], int64 [N], class names) ---


def read_fashion_mnist(root: Path, train: bool, options: dict):
    """Fashion-MNIST through torchvision's reader, from ``root`` or the Debian package's folder."""
    system_dir = Path(options.get("system_dir", "/usr/share/datasets/fashion-mnist"))
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / f).exists() for f in FASHION_MNIST_FILES):
        for name in FASHION_MNIST_FILES:
            if (raw / name).exists():
                continue
            source = next(
                (p for p in (raw / f"{name}.gz", system_dir / f"{name}.gz", system_dir / name) if p.exists()), None
            )
            if source is None and not options.get("download", False):
                raise DatasetMissingError(
                    f"Fashion-MNIST file {name} is neither in {raw} nor in {system_dir}. "
                    "Install it with `apt-get install dataset-fashion-mnist` (Debian), copy the four "
                    f"IDX files into {raw}, or set data.download=true on a machine with internet."
                )
            if source is not None:
                raw.mkdir(parents=True, exist_ok=True)
                _copy_maybe_gunzip(source, raw / name)
    ds = torchvision.datasets.FashionMNIST(str(root), train=train, download=bool(options.get("download", False)))
    return ds.data.unsqueeze(1), ds.targets.long(), list(ds.classes)


def _copy_maybe_gunzip(source: Path, target: Path) -> None:
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")  # concurrent jobs may extract too
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.replace(target)


def read_digits(root: Path, train: bool, options: dict):
    """scikit-learn's bundled 8x8 digits, split 75/25 (stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=0.25, random_state=0, stratify=digits.target
    )
    idx = idx_train if train else idx_test
    return (
        torch.from_numpy(images[idx]).unsqueeze(1),
        torch.from_numpy(digits.target[idx]).long(),
        [str(c) for c in digits.target_names],
    )


def _read_cifar(cls):
    def read(root: Path, train: bool, options: dict):
        download = bool(options.get("download", False))
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as err:
            raise DatasetMissingError(
                f"{cls.__name__} not found in {root} ({err}). Set data.download=true on a machine "
                f"with internet, or copy the extracted python-version archive into {root}."
            ) from err
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets).long(), list(ds.classes)

    read.__doc__ = f"{cls.__name__} through torchvision's class (python-version archive)."
    return read


DATASETS: dict[str, Callable] = {
    "fashion_mnist": read_fashion_mnist,
    "digits": read_digits,
    "cifar10": _read_cifar(torchvision.datasets.CIFAR10),
    "cifar100": _read_cifar(torchvision.datasets.CIFAR100),
}


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


def resize(images: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 images to ``size x size``, kept uint8."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def load_task(spec: TaskSpec, root: str | Path) -> TaskData:
    """Read, filter, resize and split a task's data."""
    if spec.dataset not in DATASETS:
        raise TaskError(
            f"task {spec.name!r}: unknown dataset {spec.dataset!r}; datasets: {', '.join(sorted(DATASETS))}"
        )
    read = DATASETS[spec.dataset]
    root = Path(root)
    x_pool, y_pool, names = read(root, True, spec.options)
    x_test, y_test, _ = read(root, False, spec.options)
    if spec.classes is not None:
        bad = [c for c in spec.classes if not 0 <= c < len(names)]
        if bad:
            raise TaskError(f"task {spec.name!r}: classes {bad} outside 0..{len(names) - 1} of {spec.dataset}")
        x_pool, y_pool = _keep_classes(x_pool, y_pool, spec.classes)
        x_test, y_test = _keep_classes(x_test, y_test, spec.classes)
        names = [names[c] for c in spec.classes]
    gen = torch.Generator().manual_seed(spec.split_seed)
    order = torch.randperm(len(y_pool), generator=gen)
    if spec.val_size >= len(order):
        raise TaskError(f"task {spec.name!r}: val_size {spec.val_size} leaves no training data ({len(order)} images)")
    val_idx, train_idx = order[: spec.val_size], order[spec.val_size :]
    if spec.train_size is not None:
        if spec.train_size > len(train_idx):
            raise TaskError(f"task {spec.name!r}: train_size {spec.train_size} > {len(train_idx)} available")
        train_idx = train_idx[: spec.train_size]
    size = spec.input_size
    return TaskData(
        spec=spec,
        class_names=names,
        train=Split(resize(x_pool[train_idx], size), y_pool[train_idx]),
        val=Split(resize(x_pool[val_idx], size), y_pool[val_idx]),
        test=Split(resize(x_test, size), y_test),
    )


def _keep_classes(x: torch.Tensor, y: torch.Tensor, classes: list[int]):
    lookup = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    keep = lookup[y] >= 0
    return x[keep], lookup[y[keep]]


class InMemoryDataset(Dataset):
    """Tensors sliced a whole batch at a time (``__getitems__``), no per-sample collation."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int):
        return self.split.images[i], self.split.labels[i]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self.split.images[idx], self.split.labels[idx]


def _as_batch(batch):
    return batch


class TaskDataModule(L.LightningDataModule):
    """Serves one task or a mix: training batches are ``{task: (images, labels)}``; validation
    and test have one dataloader per task, in task order.

    Args:
        specs: the tasks.
        root: folder for datasets (and the extracted copy of Fashion-MNIST).
        batch_size: per task and step.
        num_workers: DataLoader workers (0 keeps everything in the main process).
        eval_batch_size: for validation and test; defaults to ``batch_size``.
        train_tasks: the tasks that get training batches (default: all); the others are only
            validated and tested (tasks kept frozen from a loaded checkpoint).
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
    ):
        super().__init__()
        check_task_names([s.name for s in specs])
        self.specs = list(specs)
        self.train_tasks = list(train_tasks) if train_tasks is not None else [s.name for s in specs]
        self.root = Path(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.data: dict[str, TaskData] = {}

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def prepare_data(self) -> None:
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        for spec in self.specs:
            if spec.name not in self.data:
                self.data[spec.name] = load_task(spec, self.root)

    def _loader(self, split: Split, *, train: bool) -> DataLoader:
        return DataLoader(
            InMemoryDataset(split),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=_as_batch,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        loaders = {n: self._loader(self.data[n].train, train=True) for n in self.train_tasks}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self):
        return [self._loader(self.data[n].val, train=False) for n in self.task_names]

    def test_dataloader(self):
        return [self._loader(self.data[n].test, train=False) for n in self.task_names]


TASK_FIELDS = ("name", "dataset", "input_size", "classes", "train_size", "val_size", "split_seed", "loss_weight")


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
    check_task_names([s.name for s in specs])
    return specs
