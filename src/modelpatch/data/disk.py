"""Datasets on disk, streamed through torchvision's classes: Flowers102, Stanford Cars, FGVC Aircraft,
Food-101, DTD, Oxford-IIIT Pet, Places365, ImageNet, any ``ImageFolder``.

Labels come from the annotation files (no image is decoded to index a dataset); each item is decoded
and transformed when it is loaded (``StreamSplit``), giving ``(uint8 [3, S, S], label)``; training may
augment (random resized crop + flip), evaluation resizes to ``S / 0.875`` and takes the centre
``S x S`` crop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

from modelpatch.data.specs import (
    DatasetMissingError,
    StreamSplit,
    TaskData,
    TaskError,
    TaskSpec,
    check_classes,
    split_indices,
)

# --- readers: (root, spec) -> {split: ImageSource} ---


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


def load_from_disk(spec: TaskSpec, root: Path) -> TaskData:
    """Index a dataset on disk: labels, class subset and splits, from annotations only."""
    sources = DISK_DATASETS[spec.dataset](root, spec)
    names = list(sources["train"].classes)
    labels = {k: torch.tensor(_labels_by_name(spec, k, s, names), dtype=torch.long) for k, s in sources.items()}
    indices = {k: torch.arange(len(y)) for k, y in labels.items()}
    if spec.classes is not None:
        check_classes(spec, names)
        lookup = torch.full((len(names),), -1, dtype=torch.long)
        lookup[torch.tensor(spec.classes, dtype=torch.long)] = torch.arange(len(spec.classes))
        for k, y in labels.items():
            keep = lookup[y] >= 0
            indices[k], labels[k] = indices[k][keep], lookup[y[keep]]
        names = [names[c] for c in spec.classes]
    train_pos, val_pos = split_indices(spec, len(labels["train"]), hold_out="val" not in sources)
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
