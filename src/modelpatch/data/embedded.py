"""Embedded datasets, held in memory: Fashion-MNIST, digits, CIFAR-10/100.

Each is decoded once, resized to the task's input size and held as ``uint8`` tensors ``[N, C, H, W]``
(``Split``); batches are sliced from them (``InMemoryDataset``), so a CPU epoch is not data-bound.
The model converts to float and normalizes (``PatchModule.forward``), so served images need the same
``uint8`` layout or ``[0, 1]`` floats.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import Dataset

from modelpatch.atomic import atomic_write
from modelpatch.data.specs import DatasetMissingError, Split, TaskData, TaskSpec, check_classes, split_indices

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

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
    """Copy (and gunzip) ``source`` to ``target`` atomically: concurrent jobs may extract it too."""
    opener = gzip.open if source.suffix == ".gz" else open

    def write(tmp: Path) -> None:
        with opener(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)

    atomic_write(target, write)


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


def load_embedded(spec: TaskSpec, root: Path) -> TaskData:
    """Read, filter, resize and split a task's data, held in memory."""
    read = DATASETS[spec.dataset]
    x_pool, y_pool, names = read(root, True, spec.options)
    x_test, y_test, _ = read(root, False, spec.options)
    if spec.classes is not None:
        check_classes(spec, names)
        x_pool, y_pool = _keep_classes(x_pool, y_pool, spec.classes)
        x_test, y_test = _keep_classes(x_test, y_test, spec.classes)
        names = [names[c] for c in spec.classes]
    train_idx, val_idx = split_indices(spec, len(y_pool), hold_out=True)
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


def augment_batch(images: torch.Tensor) -> torch.Tensor:
    """Random crop (zero padding of 1/8 of the side, at least 1 pixel) and horizontal flip, drawn per
    image, of a ``uint8 [N, C, H, W]`` batch (the standard CIFAR augmentation)."""
    n, _, h, w = images.shape
    pad = max(1, min(h, w) // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


class InMemoryDataset(Dataset):
    """Tensors sliced a whole batch at a time (``__getitems__``), no per-sample collation;
    ``augment``: ``augment_batch`` on every batch."""

    def __init__(self, split: Split, augment: bool = False):
        self.split = split
        self.augment = augment

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int):
        image = self.split.images[i]
        return augment_batch(image[None])[0] if self.augment else image, self.split.labels[i]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        images = self.split.images.index_select(0, idx)  # several times faster than images[idx]
        return augment_batch(images) if self.augment else images, self.split.labels.index_select(0, idx)
