"""Tasks and their data: a task is a dataset, a class subset, an input size and a split recipe.

Two kinds of datasets:

- embedded (``DATASETS``: Fashion-MNIST, digits, CIFAR-10/100): decoded once, resized to the task's
  input size and held in memory as ``uint8`` tensors ``[N, C, H, W]`` (``Split``); batches are
  sliced from them, so a CPU epoch is not data-bound.
- on disk (``DISK_DATASETS``: Flowers102, Stanford Cars, FGVC Aircraft, Food-101, DTD, Oxford-IIIT
  Pet, Places365, ImageNet, any ``ImageFolder``): read through torchvision's dataset classes and
  streamed (``StreamSplit``): each item is decoded and transformed when it is loaded, giving
  ``(uint8 [3, S, S], label)``; training may augment (random resized crop + flip), evaluation
  resizes to ``S / 0.875`` and takes the centre ``S x S`` crop.

The model converts to float and normalizes (``PatchModule.forward``), so served images need the same
``uint8`` layout or ``[0, 1]`` floats.
"""

from __future__ import annotations

import functools
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
from torchvision.transforms import v2

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
        return isinstance(self.train, StreamSplit)

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


# --- datasets on disk, streamed through torchvision's classes: (root, spec) -> {split: ImageSource} ---


@dataclass
class ImageSource:
    """One official split of a dataset on disk: the torchvision dataset without transforms (item ``i``
    is ``(PIL image, label)``), its labels (from the annotation files: no image is decoded) and the
    class names those labels index."""

    dataset: Dataset
    labels: list[int]
    classes: list[str]


@dataclass(frozen=True)
class TorchvisionDataset:
    """How one dataset on disk is read through its torchvision class.

    Args:
        title: the dataset's name in messages.
        cls: the torchvision class; called as ``cls(root, split=..., download=..., **args)``.
        folder: the dataset's own folder, relative to ``data.root``.
        splits: ``train``/``val``/``test`` -> the class's split name (no ``val``: held out from train).
        required: ``args -> files and folders/`` in ``folder`` it cannot do without.
        how: how to get it (formatted with ``root`` and ``folder``).
        labels: dataset -> its labels, read from attributes (never by decoding images).
        classes: dataset -> the class names its labels index.
        root: the root given to ``cls``, relative to ``data.root``.
        args: the ``dataset_args`` the class takes, with their defaults.
        downloadable: torchvision can download it (``data.download=true``).
    """

    title: str
    cls: type
    folder: str
    splits: dict[str, str]
    required: Callable[[dict], list[str]]
    how: str
    labels: Callable[[Dataset], list[int]] = lambda ds: list(ds._labels)
    classes: Callable[[Dataset], list[str]] = lambda ds: list(ds.classes)
    root: str = ""
    args: dict = field(default_factory=dict)
    downloadable: bool = True

    def read(self, root: Path, spec: TaskSpec) -> dict[str, ImageSource]:
        args = _dataset_args(spec, self.args)
        folder = root / self.folder
        download = bool(spec.options.get("download", False)) and self.downloadable
        how = self.how.format(root=root, folder=folder)
        if not download:
            _require(spec, self.title, folder, self.required(args), how)
        sources = {}
        for ours, theirs in self.splits.items():
            try:
                ds = self.cls(str(root / self.root), split=theirs, download=download, **args)
            except (RuntimeError, OSError) as err:  # not found, corrupted (md5), download failed
                raise DatasetMissingError(
                    f"task {spec.name!r}: {self.title} could not be read from {folder} ({err}). {how}"
                ) from err
            sources[ours] = ImageSource(ds, [int(y) for y in self.labels(ds)], self.classes(ds))
        if download:
            _require(spec, self.title, folder, self.required(args), how)
        return sources


def _dataset_args(spec: TaskSpec, defaults: dict) -> dict:
    given = dict(spec.dataset_args or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TaskError(
            f"task {spec.name!r}: dataset_args {', '.join(unknown)} are not arguments of {spec.dataset}; "
            f"it takes: {', '.join(defaults) or 'none'}"
        )
    return {**defaults, **given}


def _require(spec: TaskSpec, title: str, folder: Path, required: Sequence[str], how: str) -> None:
    """Names ending in ``/`` are folders, the others files."""
    missing = [r for r in required if not ((folder / r).is_dir() if r.endswith("/") else (folder / r).is_file())]
    if missing:
        raise DatasetMissingError(
            f"task {spec.name!r}: {title} is expected in {folder}, which lacks {', '.join(missing)}. {how}"
        )


DOWNLOAD = "Set data.download=true on a machine with internet, or "
FGVC_CLASSES = {"variant": "variants", "family": "families", "manufacturer": "manufacturers"}


def _places365_classes(ds) -> list[str]:
    """Category names by index (``/a/apartment_building/outdoor`` -> ``apartment_building/outdoor``)."""
    names = [""] * len(ds.class_to_idx)
    for name, idx in ds.class_to_idx.items():
        names[idx] = name.split("/", 2)[-1] if name.startswith("/") else name
    return names


TORCHVISION_DATASETS = {
    "flowers102": TorchvisionDataset(
        "Oxford 102 Flowers",
        torchvision.datasets.Flowers102,
        folder="flowers-102",
        splits={"train": "train", "val": "val", "test": "test"},
        required=lambda a: ["jpg/", "imagelabels.mat", "setid.mat"],
        how=DOWNLOAD + "download 102flowers.tgz, imagelabels.mat and setid.mat from "
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ into {folder} and extract the .tgz there (it makes jpg/).",
    ),
    "stanford_cars": TorchvisionDataset(
        "Stanford Cars",
        torchvision.datasets.StanfordCars,
        folder="stanford_cars",
        splits={"train": "train", "test": "test"},
        required=lambda a: [
            "devkit/cars_meta.mat",
            "devkit/cars_train_annos.mat",
            "cars_test_annos_withlabels.mat",
            "cars_train/",
            "cars_test/",
        ],
        how="torchvision cannot download it (the original URL is gone): get cars_train, cars_test, the devkit "
        "and cars_test_annos_withlabels.mat from a mirror (e.g. the Kaggle dataset stanford-cars-dataset) and "
        "arrange them in {folder} as listed.",
        labels=lambda ds: [target for _, target in ds._samples],
        downloadable=False,
    ),
    "fgvc_aircraft": TorchvisionDataset(
        "FGVC Aircraft",
        torchvision.datasets.FGVCAircraft,
        folder="fgvc-aircraft-2013b",
        splits={"train": "train", "val": "val", "test": "test"},
        required=lambda a: [
            "data/images/",
            f"data/{FGVC_CLASSES.get(a['annotation_level'], a['annotation_level'])}.txt",
            *(f"data/images_{a['annotation_level']}_{s}.txt" for s in ("train", "val", "test")),
        ],
        how=DOWNLOAD + "download https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
        "fgvc-aircraft-2013b.tar.gz and extract it into {root}.",
        args={"annotation_level": "variant"},
    ),
    "food101": TorchvisionDataset(
        "Food-101",
        torchvision.datasets.Food101,
        folder="food-101",
        splits={"train": "train", "test": "test"},
        required=lambda a: ["meta/train.json", "meta/test.json", "images/"],
        how=DOWNLOAD + "download http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz and extract it into {root}.",
    ),
    "dtd": TorchvisionDataset(
        "Describable Textures (DTD)",
        torchvision.datasets.DTD,
        folder="dtd/dtd",
        splits={"train": "train", "val": "val", "test": "test"},
        required=lambda a: ["images/", *(f"labels/{s}{a['partition']}.txt" for s in ("train", "val", "test"))],
        how=DOWNLOAD + "download https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz and "
        "extract it into {root}/dtd.",
        args={"partition": 1},
    ),
    "oxford_pets": TorchvisionDataset(
        "Oxford-IIIT Pet",
        torchvision.datasets.OxfordIIITPet,
        folder="oxford-iiit-pet",
        splits={"train": "trainval", "test": "test"},
        required=lambda a: ["images/", "annotations/trainval.txt", "annotations/test.txt"],
        how=DOWNLOAD + "download images.tar.gz and annotations.tar.gz from "
        "https://www.robots.ox.ac.uk/~vgg/data/pets/data/ and extract both into {folder}.",
    ),
    "places365": TorchvisionDataset(
        "Places365-Standard",
        torchvision.datasets.Places365,
        folder="places365",
        splits={"train": "train-standard", "test": "val"},
        required=lambda a: [
            "categories_places365.txt",
            "places365_train_standard.txt",
            "places365_val.txt",
            "data_256_standard/" if a["small"] else "data_large_standard/",
            "val_256/" if a["small"] else "val_large/",
        ],
        how=DOWNLOAD + "download filelist_places365-standard.tar, train_256_places365standard.tar and "
        "val_256.tar from http://data.csail.mit.edu/places/places365/, extract them into {folder} and rename "
        "its data_256 folder to data_256_standard.",
        labels=lambda ds: list(ds.targets),
        classes=_places365_classes,
        root="places365",
        args={"small": True},
    ),
}


@functools.lru_cache(maxsize=16)
def _scan_image_folder(folder: str, allow_empty: bool) -> torchvision.datasets.ImageFolder:
    """One scan per folder and process: tasks that share a folder (ImageNet at several input sizes)
    share the file list."""
    return torchvision.datasets.ImageFolder(folder, allow_empty=allow_empty)


def _read_image_folders(spec: TaskSpec, folders: dict[str, Path], how: str) -> dict[str, ImageSource]:
    """``ImageFolder`` per split; the other splits' labels are mapped to train's classes by name."""
    sources = {}
    for split, folder in folders.items():
        try:
            ds = _scan_image_folder(str(folder), split != "train")
        except OSError as err:  # no class folders, or a training class without images
            raise DatasetMissingError(f"task {spec.name!r}: cannot read images from {folder} ({err}). {how}") from err
        sources[split] = ImageSource(ds, list(ds.targets), list(ds.classes))
    names = sources["train"].classes
    for split, source in sources.items():
        source.labels = _labels_by_name(spec, split, source, names)
        source.classes = list(names)
    return sources


IMAGENET_HOW = (
    "ImageNet cannot be downloaded automatically (it needs an account at https://image-net.org): extract "
    "ILSVRC2012_img_train.tar into {folder}/train (one folder per WordNet id: extract the per-class tar files "
    "too) and ILSVRC2012_img_val.tar into {folder}/val, sorted into the same WordNet-id folders (e.g. with "
    "the usual valprep.sh). Optional: torchvision.datasets.ImageNet's meta.bin in {folder} gives class names."
)


def read_imagenet(root: Path, spec: TaskSpec) -> dict[str, ImageSource]:
    """ImageNet (ILSVRC 2012) in ImageFolder layout: ``root/imagenet/{train,val}/<wnid>/*.JPEG``.

    The official validation images are the test split; validation is held out from training.
    """
    _dataset_args(spec, {})
    folder = root / "imagenet"
    how = IMAGENET_HOW.format(folder=folder)
    _require(spec, "ImageNet", folder, ["train/", "val/"], how)
    sources = _read_image_folders(spec, {"train": folder / "train", "test": folder / "val"}, how)
    if (folder / "meta.bin").is_file():  # written by torchvision.datasets.ImageNet: wnid -> names
        wnid_to_names = torch.load(folder / "meta.bin", weights_only=True)[0]
        for source in sources.values():
            source.classes = [wnid_to_names.get(w, (w,))[0] for w in source.classes]
    return sources


def read_imagefolder(root: Path, spec: TaskSpec) -> dict[str, ImageSource]:
    """Your own images: ``path/train/<class>/*`` and ``path/val/<class>/*`` or ``path/test/<class>/*``.

    With both ``val/`` and ``test/``, each is used as such; with one of them, it is the test split and
    validation is held out (``val_size``) from ``train/``.
    """
    _dataset_args(spec, {})
    how = (
        "An imagefolder task reads task.path=<folder> holding train/<class>/<image> and val/<class>/<image> "
        "or test/<class>/<image> (any format PIL reads); a relative path is taken from data.root."
    )
    if not spec.path:
        raise TaskError(f"task {spec.name!r}: set task.path. {how}")
    folder = Path(spec.path).expanduser()
    folder = folder if folder.is_absolute() else root / folder
    have = [s for s in ("train", "val", "test") if (folder / s).is_dir()]
    if "train" not in have or len(have) < 2:
        raise DatasetMissingError(
            f"task {spec.name!r}: {folder} needs train/ and val/ or test/ (found: {', '.join(have) or 'none'}). {how}"
        )
    folders = {"train": folder / "train", "test": folder / ("test" if "test" in have else "val")}
    if len(have) == 3:
        folders["val"] = folder / "val"
    return _read_image_folders(spec, folders, how)


def _read_torchvision(name: str) -> Callable:
    def read(root: Path, spec: TaskSpec) -> dict[str, ImageSource]:
        return TORCHVISION_DATASETS[name].read(root, spec)

    read.__doc__ = f"{TORCHVISION_DATASETS[name].title} through torchvision's class."
    return read


DISK_DATASETS: dict[str, Callable[[Path, TaskSpec], dict[str, ImageSource]]] = {
    **{name: _read_torchvision(name) for name in TORCHVISION_DATASETS},
    "imagenet": read_imagenet,
    "imagefolder": read_imagefolder,
}


def _labels_by_name(spec: TaskSpec, split: str, source: ImageSource, names: list[str]) -> list[int]:
    """``source``'s labels as indices into ``names`` (train's classes)."""
    if source.classes == names:
        return list(source.labels)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({source.classes[y] for y in source.labels} - set(index))
    if unknown:
        raise TaskError(
            f"task {spec.name!r}: the {split} split has classes the training split lacks: {', '.join(unknown[:10])}"
        )
    return [index[source.classes[y]] for y in source.labels]


def image_transform(size: int, *, augment: bool = False) -> v2.Compose:
    """PIL image (any mode: grey, CMYK, palette are made RGB) -> ``uint8 [3, size, size]``.

    ``augment``: random resized crop and horizontal flip (training); otherwise resize the shorter
    side to ``size / 0.875`` and take the centre crop (evaluation, and training without augmentation).
    """
    if augment:
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.RGB(), *steps, v2.PILToTensor()])


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
    """Read, filter, resize and split a task's data (in memory), or index it on disk (streamed)."""
    if spec.dataset in DISK_DATASETS:
        return _load_from_disk(spec, Path(root))
    if spec.dataset not in DATASETS:
        known = sorted([*DATASETS, *DISK_DATASETS])
        raise TaskError(f"task {spec.name!r}: unknown dataset {spec.dataset!r}; datasets: {', '.join(known)}")
    read = DATASETS[spec.dataset]
    root = Path(root)
    x_pool, y_pool, names = read(root, True, spec.options)
    x_test, y_test, _ = read(root, False, spec.options)
    if spec.classes is not None:
        _check_classes(spec, names)
        x_pool, y_pool = _keep_classes(x_pool, y_pool, spec.classes)
        x_test, y_test = _keep_classes(x_test, y_test, spec.classes)
        names = [names[c] for c in spec.classes]
    train_idx, val_idx = _split_indices(spec, len(y_pool), hold_out=True)
    size = spec.input_size
    return TaskData(
        spec=spec,
        class_names=names,
        train=Split(resize(x_pool[train_idx], size), y_pool[train_idx]),
        val=Split(resize(x_pool[val_idx], size), y_pool[val_idx]),
        test=Split(resize(x_test, size), y_test),
    )


def _check_classes(spec: TaskSpec, names: list[str]) -> None:
    bad = [c for c in spec.classes if not 0 <= c < len(names)]
    if bad:
        raise TaskError(f"task {spec.name!r}: classes {bad} outside 0..{len(names) - 1} of {spec.dataset}")


def _split_indices(spec: TaskSpec, n: int, *, hold_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


def _load_from_disk(spec: TaskSpec, root: Path) -> TaskData:
    """Index a dataset on disk: labels, class subset and splits, from annotations only."""
    sources = DISK_DATASETS[spec.dataset](root, spec)
    names = list(sources["train"].classes)
    labels = {k: torch.tensor(_labels_by_name(spec, k, s, names), dtype=torch.long) for k, s in sources.items()}
    indices = {k: torch.arange(len(y)) for k, y in labels.items()}
    if spec.classes is not None:
        _check_classes(spec, names)
        lookup = torch.full((len(names),), -1, dtype=torch.long)
        lookup[torch.tensor(spec.classes, dtype=torch.long)] = torch.arange(len(spec.classes))
        for k, y in labels.items():
            keep = lookup[y] >= 0
            indices[k], labels[k] = indices[k][keep], lookup[y[keep]]
        names = [names[c] for c in spec.classes]
    train_pos, val_pos = _split_indices(spec, len(labels["train"]), hold_out="val" not in sources)
    train_tf = image_transform(spec.input_size, augment=spec.augment)
    eval_tf = image_transform(spec.input_size)

    def split(name: str, positions: torch.Tensor | None, transform) -> StreamSplit:
        pos = slice(None) if positions is None else positions
        return StreamSplit(sources[name].dataset, indices[name][pos], labels[name][pos], transform)

    return TaskData(
        spec=spec,
        class_names=names,
        train=split("train", train_pos, train_tf),
        val=split("val", None, eval_tf) if "val" in sources else split("train", val_pos, eval_tf),
        test=split("test", None, eval_tf),
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
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0 and (train or in_memory),
        )

    def train_dataloader(self):
        loaders = {
            n: self._loader(self.data[n].train, train=True, augment=self.data[n].spec.augment) for n in self.train_tasks
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self):
        return [self._loader(self.data[n].val, train=False) for n in self.task_names]

    def test_dataloader(self):
        return [self._loader(self.data[n].test, train=False) for n in self.task_names]


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
    check_task_names([s.name for s in specs])
    return specs
