"""Tiny copies of the datasets on disk, each in its real layout (what torchvision 0.29 reads).

Every writer puts three classes into ``root`` with 3 training and 2 test images per class, plus 1
validation image per class where the dataset has an official validation split. Images are random
pixels of random sizes (8..40 px), written as real JPEG/PNG files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TRAIN, VAL, TEST = 3, 1, 2  # images per class and split

FLOWERS = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]  # torchvision's classes 0..2
CARS = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
AIRCRAFT = {"707-320": "Boeing", "727-200": "Boeing", "A300B4": "Airbus"}  # variant -> manufacturer
FOOD = ["apple_pie", "baby_back_ribs", "baklava"]
TEXTURES = ["banded", "blotchy", "braided"]
PETS = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier"]  # class ids 1..3
PLACES = ["/a/airfield", "/b/bakery/shop", "/c/canyon"]
WNIDS = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish",), "n01484850": ("great white shark",)}


def write_image(path: Path, rng: np.random.Generator, mode: str = "RGB") -> None:
    """Random pixels, ``mode`` RGB, L (grey) or CMYK; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in rng.integers(8, 41, size=2))
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    image = image.convert(mode) if mode != "RGB" else image
    image.save(path)


def _per_class(classes, *counts):
    """``[(split index, class index), ...]`` for ``counts[s]`` images of every class in split ``s``."""
    return [(s, c) for s, n in enumerate(counts) for c in range(len(classes)) for _ in range(n)]


def write_flowers102(root: Path, rng: np.random.Generator) -> None:
    """``flowers-102/jpg/image_00001.jpg``, ``imagelabels.mat`` (1-based labels), ``setid.mat``."""
    from scipy.io import savemat

    folder = root / "flowers-102"
    items = _per_class(FLOWERS, TRAIN, VAL, TEST)
    ids: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    labels = []
    for image_id, (split, c) in enumerate(items, 1):
        write_image(folder / "jpg" / f"image_{image_id:05d}.jpg", rng)
        ids[("trnid", "valid", "tstid")[split]].append(image_id)
        labels.append(c + 1)
    savemat(folder / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(folder / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})


def write_stanford_cars(root: Path, rng: np.random.Generator) -> None:
    """``stanford_cars/devkit/{cars_meta,cars_train_annos}.mat``, ``cars_test_annos_withlabels.mat``,
    ``cars_train/``, ``cars_test/`` (annotation structs with ``fname`` and 1-based ``class``)."""
    from scipy.io import savemat

    folder = root / "stanford_cars"
    (folder / "devkit").mkdir(parents=True)
    savemat(folder / "devkit" / "cars_meta.mat", {"class_names": np.array([CARS], dtype=object)})
    fields = [(f, object) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    for split, images, annos in (
        (0, "cars_train", folder / "devkit" / "cars_train_annos.mat"),
        (1, "cars_test", folder / "cars_test_annos_withlabels.mat"),
    ):
        items = [c for s, c in _per_class(CARS, TRAIN, TEST) if s == split]
        table = np.zeros((1, len(items)), dtype=fields)
        for i, c in enumerate(items):
            name = f"{i + 1:05d}.jpg"
            write_image(folder / images / name, rng)
            table[0, i] = (np.uint8(1), np.uint8(1), np.uint8(8), np.uint8(8), np.uint8(c + 1), name)
        savemat(annos, {"annotations": table})


def write_fgvc_aircraft(root: Path, rng: np.random.Generator) -> None:
    """``fgvc-aircraft-2013b/data/images/<id>.jpg``, ``variants.txt``, ``images_variant_<split>.txt``
    (and the manufacturer-level files)."""
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = list(AIRCRAFT)
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    (data / "manufacturers.txt").write_text("".join(f"{m}\n" for m in dict.fromkeys(AIRCRAFT.values())))
    lines: dict[str, list[str]] = {}
    for i, (split, c) in enumerate(_per_class(variants, TRAIN, VAL, TEST)):
        image_id = f"{1025794 + i:07d}"
        write_image(data / "images" / f"{image_id}.jpg", rng)
        name = ("train", "val", "test")[split]
        lines.setdefault(f"images_variant_{name}.txt", []).append(f"{image_id} {variants[c]}\n")
        lines.setdefault(f"images_manufacturer_{name}.txt", []).append(f"{image_id} {AIRCRAFT[variants[c]]}\n")
    for name, content in lines.items():
        (data / name).write_text("".join(content))


def write_food101(root: Path, rng: np.random.Generator) -> None:
    """``food-101/images/<class>/<id>.jpg``, ``meta/{train,test}.json`` ({class: ["<class>/<id>"]}),
    ``meta/classes.txt``."""
    folder = root / "food-101"
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in FOOD))
    meta: list[dict[str, list[str]]] = [{c: [] for c in FOOD}, {c: [] for c in FOOD}]
    for i, (split, c) in enumerate(_per_class(FOOD, TRAIN, TEST)):
        rel = f"{FOOD[c]}/{100000 + i}"
        write_image(folder / "images" / f"{rel}.jpg", rng)
        meta[split][FOOD[c]].append(rel)
    for split, name in enumerate(("train", "test")):
        (folder / "meta" / f"{name}.json").write_text(json.dumps(meta[split]))


def write_dtd(root: Path, rng: np.random.Generator) -> None:
    """``dtd/dtd/images/<class>/<class>_NNNN.jpg``, ``dtd/dtd/labels/{train,val,test}1.txt``."""
    folder = root / "dtd" / "dtd"
    (folder / "labels").mkdir(parents=True)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, (split, c) in enumerate(_per_class(TEXTURES, TRAIN, VAL, TEST)):
        rel = f"{TEXTURES[c]}/{TEXTURES[c]}_{i:04d}.jpg"
        write_image(folder / "images" / rel, rng)
        lines[("train", "val", "test")[split]].append(f"{rel}\n")
    for name, content in lines.items():
        (folder / "labels" / f"{name}1.txt").write_text("".join(content))


def write_oxford_pets(root: Path, rng: np.random.Generator) -> None:
    """``oxford-iiit-pet/images/<Breed>_<n>.jpg``, ``annotations/{trainval,test}.txt`` lines
    ``<image> <class id> <species> <breed id>``, ``annotations/trimaps/`` (not read for classes)."""
    folder = root / "oxford-iiit-pet"
    (folder / "annotations" / "trimaps").mkdir(parents=True)
    lines: list[list[str]] = [[], []]
    for i, (split, c) in enumerate(_per_class(PETS, TRAIN, TEST)):
        image_id = f"{PETS[c]}_{i + 1}"
        write_image(folder / "images" / f"{image_id}.jpg", rng)
        species = 1 if PETS[c][0].isupper() else 2  # cat breeds are capitalized
        lines[split].append(f"{image_id} {c + 1} {species} {c + 1}\n")
    (folder / "annotations" / "trainval.txt").write_text("".join(lines[0]))
    (folder / "annotations" / "test.txt").write_text("".join(lines[1]))


def write_places365(root: Path, rng: np.random.Generator) -> None:
    """``places365/categories_places365.txt``, ``places365_{train_standard,val}.txt``, small images in
    ``data_256_standard/<letter>/<category>/NNNNNNNN.jpg`` and ``val_256/Places365_val_NNNNNNNN.jpg``."""
    folder = root / "places365"
    folder.mkdir(parents=True)
    (folder / "categories_places365.txt").write_text("".join(f"{p} {i}\n" for i, p in enumerate(PLACES)))
    train, val = [], []
    for i, (split, c) in enumerate(_per_class(PLACES, TRAIN, TEST)):
        if split == 0:
            rel = f"{PLACES[c]}/{i + 1:08d}.jpg"
            write_image(folder / "data_256_standard" / rel.lstrip("/"), rng)
            train.append(f"{rel} {c}\n")
        else:
            name = f"Places365_val_{i + 1:08d}.jpg"
            write_image(folder / "val_256" / name, rng)
            val.append(f"{name} {c}\n")
    (folder / "places365_train_standard.txt").write_text("".join(train))
    (folder / "places365_val.txt").write_text("".join(val))


def write_imagenet(root: Path, rng: np.random.Generator) -> None:
    """``imagenet/{train,val}/<wnid>/*.JPEG`` and torchvision's ``meta.bin`` (wnid -> names)."""
    folder = root / "imagenet"
    wnids = list(WNIDS)
    for i, (split, c) in enumerate(_per_class(wnids, TRAIN, TEST)):
        if split == 0:
            write_image(folder / "train" / wnids[c] / f"{wnids[c]}_{i + 1}.JPEG", rng)
        else:
            write_image(folder / "val" / wnids[c] / f"ILSVRC2012_val_{i + 1:08d}.JPEG", rng)
    torch.save((WNIDS, wnids), folder / "meta.bin")  # (wnid -> names, validation wnids)


def write_imagefolder(root: Path, rng: np.random.Generator, *, with_test: bool = True) -> Path:
    """``mine/{train,val[,test]}/<class>/*``: grey PNGs, CMYK JPEGs and RGB JPEGs; ``test/`` (or ``val/``
    when there is no ``test/``) lacks the class ``dog``. Returns the folder."""
    folder = root / "mine"
    classes = ["cat", "dog", "fox"]
    modes = {"cat": ("L", "png"), "dog": ("CMYK", "jpg"), "fox": ("RGB", "jpeg")}
    splits = [("train", TRAIN, classes), ("val", VAL, classes), ("test", TEST, ["cat", "fox"])]
    if not with_test:
        splits = [("train", TRAIN, classes), ("val", TEST, ["cat", "fox"])]
    for split, n, present in splits:
        for c in present:
            mode, ext = modes[c]
            for i in range(n):
                write_image(folder / split / c / f"{c}{i}.{ext}", rng, mode)
    return folder


WRITERS = {
    "flowers102": write_flowers102,
    "stanford_cars": write_stanford_cars,
    "fgvc_aircraft": write_fgvc_aircraft,
    "food101": write_food101,
    "dtd": write_dtd,
    "oxford_pets": write_oxford_pets,
    "places365": write_places365,
    "imagenet": write_imagenet,
    "imagefolder": write_imagefolder,
}
