"""Datasets on disk, streamed through torchvision's classes: tiny copies in each real layout."""

import json
import re

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from modelpatch.data import DatasetMissingError, TaskDataModule, TaskError, TaskSpec, load_task, task_specs
from modelpatch.data.embedded import augment_batch
from modelpatch.data.specs import StreamSplit
from modelpatch.run import build, train

from .fixtures_datasets import AIRCRAFT, CARS, FLOWERS, FOOD, TEXTURES, WRITERS, write_food101, write_imagefolder
from .support import CONF

SIZE = 24
HOLD_OUT = {"val_size": 3}  # of the 9 training images, where the dataset has no validation split

# task -> (class names (the first three), number of classes, (train, val, test) sizes, task overrides)
CASES = {
    "flowers102": (FLOWERS, 102, (9, 3, 6), {}),
    "stanford_cars": (CARS, 3, (6, 3, 6), HOLD_OUT),
    "fgvc_aircraft": (list(AIRCRAFT), 3, (9, 3, 6), {}),
    "food101": (FOOD, 3, (6, 3, 6), HOLD_OUT),
    "dtd": (TEXTURES, 3, (9, 3, 6), {}),
    "oxford_pets": (["Abyssinian", "American Bulldog", "American Pit Bull Terrier"], 3, (6, 3, 6), HOLD_OUT),
    "places365": (["airfield", "bakery/shop", "canyon"], 3, (6, 3, 6), HOLD_OUT),
    "imagenet": (["tench", "goldfish", "great white shark"], 3, (6, 3, 6), HOLD_OUT),
    "imagefolder": (["cat", "dog", "fox"], 3, (9, 3, 4), {"path": "mine"}),  # its test/ lacks dog
}


pytestmark = pytest.mark.usefixtures("no_md5")


def spec_from_config(name: str, download: bool = False, **overrides) -> TaskSpec:
    """The task as conf/task/<name>.yaml defines it (through task_specs), with overrides."""
    entry = OmegaConf.to_container(OmegaConf.load(CONF / "task" / f"{name}.yaml"))
    entry.update({"input_size": SIZE, **overrides})
    (spec,) = task_specs(entry, {"download": download})
    return spec


def write(name: str, root, seed: int = 0):
    WRITERS[name](root, np.random.default_rng(seed))


def load_without_decoding(spec: TaskSpec, root, monkeypatch):
    """load_task with PIL unable to open images: labels and splits come from the annotations."""

    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded while loading the task")

    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", refuse)
        return load_task(spec, root)


def check_items(split: StreamSplit, num_classes: int) -> None:
    for i in range(len(split)):
        image, label = split[i]
        assert type(image) is torch.Tensor and image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
        assert isinstance(label, int) and 0 <= label < num_classes and label == int(split.labels[i])


@pytest.mark.parametrize("name", list(CASES))
def test_task_streams_from_its_real_layout(name, tmp_path, monkeypatch):
    names, num_classes, sizes, overrides = CASES[name]
    write(name, tmp_path)
    spec = spec_from_config(name, **overrides)
    assert spec.augment and spec.input_size == SIZE
    data = load_without_decoding(spec, tmp_path, monkeypatch)
    assert data.streams and data.num_classes == num_classes and data.class_names[:3] == names
    assert tuple(len(s) for s in (data.train, data.val, data.test)) == sizes
    for split in (data.train, data.val, data.test):
        assert isinstance(split, StreamSplit) and split.labels.dtype == torch.long
        assert len(split.labels) == len(split.indices)
        check_items(split, num_classes)
    assert sorted(data.train.labels.unique().tolist()) == [0, 1, 2]

    # a class subset, relabelled in the order given; train/val items keep their source class
    sub = load_without_decoding(spec_from_config(name, **overrides, classes=[2, 0]), tmp_path, monkeypatch)
    assert sub.class_names == [data.class_names[2], data.class_names[0]] and sub.num_classes == 2
    assert len(sub.test) == 4  # 2 test images of each kept class
    if "val_size" in overrides:
        assert (len(sub.train), len(sub.val)) == (3, 3)
    else:
        assert (len(sub.train), len(sub.val)) == (6, 2)
    for split in (sub.train, sub.val, sub.test):
        assert set(split.labels.tolist()) <= {0, 1}
        check_items(split, 2)
    for split in (sub.train, sub.val):
        for i in range(len(split)):
            _, source_label = split.source[int(split.indices[i])]
            assert source_label == [2, 0][int(split.labels[i])]

    # a seeded training subset
    few = load_without_decoding(spec_from_config(name, **overrides, train_size=2), tmp_path, monkeypatch)
    again = load_task(spec_from_config(name, **overrides, train_size=2), tmp_path)
    assert len(few.train) == 2 and torch.equal(few.train.indices, again.train.indices)
    assert len(few.test) == sizes[2]


def test_training_augments_and_evaluation_is_deterministic(tmp_path):
    write("flowers102", tmp_path)
    data = load_task(spec_from_config("flowers102"), tmp_path)
    torch.manual_seed(0)
    draws = [data.train[0][0] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random resized crop + flip
    assert torch.equal(data.val[0][0], data.val[0][0]) and torch.equal(data.test[1][0], data.test[1][0])
    plain = load_task(spec_from_config("flowers102", augment=False), tmp_path)
    assert torch.equal(plain.train[0][0], plain.train[0][0])  # resize + centre crop
    assert torch.equal(plain.train.indices, data.train.indices)


def test_imagefolder_splits_and_modes(tmp_path):
    write_imagefolder(tmp_path, np.random.default_rng(0), with_test=False)
    data = load_task(spec_from_config("imagefolder", path=str(tmp_path / "mine"), val_size=3), tmp_path / "other")
    # no test/: val/ is the test split and validation is held out from train/
    assert data.class_names == ["cat", "dog", "fox"] and (len(data.train), len(data.val), len(data.test)) == (6, 3, 4)
    assert sorted(data.test.labels.tolist()) == [0, 0, 2, 2]  # val/ has no dog: mapped to train's classes by name
    check_items(data.test, 3)  # grey PNGs and CMYK JPEGs come out RGB
    with pytest.raises(TaskError, match=r"set task\.path"):
        load_task(spec_from_config("imagefolder"), tmp_path)
    with pytest.raises(TaskError, match="dataset_args partition are not arguments of imagefolder"):
        load_task(spec_from_config("imagefolder", path="mine", dataset_args={"partition": 2}), tmp_path)


def test_tasks_sharing_an_image_folder_scan_it_once(tmp_path):
    write("imagenet", tmp_path)
    small, large = (load_task(spec_from_config("imagenet", input_size=s, **HOLD_OUT), tmp_path) for s in (16, 32))
    assert small.train.source is large.train.source and small.test.source is large.test.source
    assert small.test[0][0].shape == (3, 16, 16) and large.test[0][0].shape == (3, 32, 32)


def test_dataset_args_reach_the_torchvision_class(tmp_path):
    write("fgvc_aircraft", tmp_path)
    data = load_task(spec_from_config("fgvc_aircraft", dataset_args={"annotation_level": "manufacturer"}), tmp_path)
    assert data.class_names == ["Boeing", "Airbus"] and len(data.train) == 9
    assert sorted(data.test.labels.tolist()) == [0, 0, 0, 0, 1, 1]


def test_download_is_passed_to_torchvision(tmp_path, monkeypatch):
    urls = []

    def fake_download(url, download_root, md5=None, **kwargs):  # no internet here: write the tiny copy
        urls.append(url)
        write_food101(tmp_path, np.random.default_rng(0))

    monkeypatch.setattr(torchvision.datasets.food101, "download_and_extract_archive", fake_download)
    data = load_task(spec_from_config("food101", download=True, **HOLD_OUT), tmp_path)
    assert urls == [torchvision.datasets.Food101._URL] and data.class_names == FOOD and len(data.test) == 6


MISSING = {  # task -> (its folder under the data root, a word of the advice)
    "flowers102": ("flowers-102", "102flowers.tgz"),
    "stanford_cars": ("stanford_cars", "cannot download"),
    "fgvc_aircraft": ("fgvc-aircraft-2013b", "fgvc-aircraft-2013b.tar.gz"),
    "food101": ("food-101", "food-101.tar.gz"),
    "dtd": ("dtd/dtd", "dtd-r1.0.1.tar.gz"),
    "oxford_pets": ("oxford-iiit-pet", "annotations.tar.gz"),
    "places365": ("places365", "val_256.tar"),
    "imagenet": ("imagenet", "image-net.org"),
    "imagefolder": ("mine", "train/<class>/<image>"),
}


@pytest.mark.parametrize("name", list(MISSING))
def test_missing_dataset_names_its_folder(name, tmp_path):
    folder, advice = MISSING[name]
    spec = spec_from_config(name, path="mine") if name == "imagefolder" else spec_from_config(name)
    with pytest.raises(DatasetMissingError, match=re.escape(str(tmp_path / folder))) as err:
        load_task(spec, tmp_path)
    assert advice in str(err.value)


def test_a_partial_copy_lists_what_it_lacks(tmp_path):
    write("flowers102", tmp_path)
    (tmp_path / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(DatasetMissingError, match=r"flowers-102, which lacks setid\.mat"):
        load_task(spec_from_config("flowers102"), tmp_path)
    # torchvision cannot download Stanford Cars: data.download=true does not hide that
    with pytest.raises(DatasetMissingError, match="cannot download"):
        load_task(spec_from_config("stanford_cars", download=True), tmp_path)


def test_datamodule_mixes_streamed_and_in_memory_tasks(tmp_path):
    write("flowers102", tmp_path)
    specs = [spec_from_config("flowers102"), TaskSpec("digits", "digits", input_size=SIZE, train_size=32)]
    dm = TaskDataModule(specs, root=tmp_path, batch_size=4, eval_batch_size=5, num_workers=1)
    dm.setup()
    assert not dm.cacheable and TaskDataModule(specs[1:], root=tmp_path).cacheable
    batch = next(iter(dm.train_dataloader()))
    images, labels = batch["flowers102"]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, SIZE, SIZE) and labels.dtype == torch.long
    assert batch["digits"][0].shape == (4, 1, SIZE, SIZE)
    val = list(dm.val_dataloader()[0])
    assert [len(y) for _, y in val] == [3]
    test = list(dm.test_dataloader()[0])
    assert [x.shape for x, _ in test] == [(5, 3, SIZE, SIZE), (1, 3, SIZE, SIZE)]


def test_in_memory_augmentation_crops_and_flips(monkeypatch):
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = augment_batch(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(4):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    dm = TaskDataModule([TaskSpec("digits", "digits", input_size=16, train_size=32, augment=True)], root="unused")
    dm.setup()
    assert not dm.cacheable
    images, _ = next(iter(dm.train_dataloader()))["digits"]
    assert images.shape == (32, 1, 16, 16) and images.dtype == torch.uint8


def test_task_configs_compose(make_cfg):
    for name in CASES:
        cfg = make_cfg(f"task={name}")
        (spec,) = task_specs(OmegaConf.to_container(cfg.task, resolve=True), OmegaConf.to_container(cfg.data))
        assert (spec.name, spec.dataset, spec.input_size, spec.augment) == (name, name, 224, True)
    cfg = make_cfg("task=multi", "task.tasks=[imagenet,places365]", "task.catalog.imagenet.input_size=299")
    specs = task_specs(OmegaConf.to_container(cfg.task, resolve=True), OmegaConf.to_container(cfg.data))
    assert [(s.name, s.input_size, s.val_size) for s in specs] == [("imagenet", 299, 10000), ("places365", 224, 10000)]
    assert specs[1].dataset_args == {"small": True}


FLOWERS_RUN = ("task=flowers102", "task.input_size=32", "backbone.width=0.25")


def test_feature_caching_is_skipped_for_streamed_tasks(make_cfg, tmp_path):
    write("flowers102", tmp_path / "data")
    cfg = make_cfg(*FLOWERS_RUN, f"data.root={tmp_path / 'data'}", "patch=logits")
    _, model = build(cfg)
    assert model.model.fixed_backbone and not model.inputs_are_features  # auto: not exact with augmentation
    with pytest.raises(ValueError, match="only for in-memory tasks"):
        build(make_cfg(*FLOWERS_RUN, f"data.root={tmp_path / 'data'}", "patch=logits", "data.cache_features=true"))


def test_a_streamed_task_trains_end_to_end(make_cfg, tmp_path):
    write("flowers102", tmp_path / "data")
    cfg = make_cfg(*FLOWERS_RUN, f"data.root={tmp_path / 'data'}", "patch=bn", "task.augment=true")
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1  # 9 training images, batches of 16
    assert 0.0 <= metrics["test/flowers102/acc"] <= 1.0 and "val/acc" in metrics
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    task = results["tasks"]["flowers102"]
    assert task["num_classes"] == 102 and task["train_samples"] == 9
    assert (tmp_path / "run" / "patches" / "flowers102.safetensors").is_file()
