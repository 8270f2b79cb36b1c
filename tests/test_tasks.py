"""Tasks and data: the embedded datasets, class subsets, splits, and clear errors."""

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from modelpatch.data import (
    DatasetMissingError,
    TaskDataModule,
    TaskError,
    TaskSpec,
    check_task_names,
    load_task,
    task_specs,
)


def test_fmnist_b_from_the_debian_package(fashion_mnist, data_dir):
    spec = TaskSpec(
        "fmnist_b",
        "fashion_mnist",
        input_size=32,
        classes=[5, 6, 7, 8, 9],
        train_size=1000,
        val_size=500,
        options={"system_dir": str(fashion_mnist)},
    )
    data = load_task(spec, data_dir)
    assert data.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert data.train.images.shape == (1000, 1, 32, 32) and data.train.images.dtype == torch.uint8
    assert len(data.val.labels) == 500 and len(data.test.labels) == 5000
    for split in (data.train, data.val, data.test):
        assert set(split.labels.unique().tolist()) == {0, 1, 2, 3, 4}
    again = load_task(spec, data_dir)
    assert torch.equal(data.train.labels, again.train.labels)  # the subset is seeded
    # The raw files torchvision reads were extracted from the .gz ones, nothing half-written left.
    raw = data_dir / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(
        ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    )


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    spec = TaskSpec("fmnist", "fashion_mnist", input_size=32, options={"system_dir": str(tmp_path / "none")})
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_task(spec, tmp_path / "data")


def test_digits_are_resized_and_split():
    data = load_task(TaskSpec("digits", "digits", input_size=24, val_size=200), "unused")
    assert data.num_classes == 10
    assert data.train.images.shape[1:] == (1, 24, 24)
    assert len(data.train.labels) + len(data.val.labels) + len(data.test.labels) == 1797


def write_tiny_cifar10(root, n=20):
    """A CIFAR-10 folder in the real python-version layout (pickled dict batches)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(10)) * (n // 10)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    write_tiny_cifar10(tmp_path)
    # torchvision checks the md5 of the real archive; the tiny copy is checked for presence only.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.exists(path))
    data = load_task(TaskSpec("cifar10", "cifar10", input_size=32, val_size=10), tmp_path)
    assert data.num_classes == 10 and data.class_names[0] == "airplane"
    assert data.train.images.shape == (90, 3, 32, 32) and len(data.test.labels) == 20


def test_missing_cifar_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"data\.download=true"):
        load_task(TaskSpec("cifar10", "cifar10", input_size=32), tmp_path)


@pytest.mark.parametrize(
    ("names", "message"),
    [([], "empty"), (["a", "a"], "more than once: a"), (["train"], "'train' cannot be used"), (["a.b"], "'a.b'")],
)
def test_bad_task_names(names, message):
    with pytest.raises(TaskError, match=message):
        check_task_names(names)


def test_task_config_errors():
    with pytest.raises(TaskError, match=r"unknown task.*nope; known tasks: digits"):
        task_specs({"tasks": ["nope"], "catalog": {"digits": {"name": "digits"}}})
    with pytest.raises(TaskError, match="unknown dataset 'mnist'"):
        load_task(TaskSpec("x", "mnist", input_size=32), "unused")
    with pytest.raises(TaskError, match="train_size 5000 > "):
        load_task(TaskSpec("digits", "digits", input_size=8, train_size=5000), "unused")
    with pytest.raises(TaskError, match=r"classes \[12\]"):
        load_task(TaskSpec("digits", "digits", input_size=8, classes=[1, 12]), "unused")


def test_datamodule_serves_a_dict_per_step_and_a_loader_per_task():
    specs = [
        TaskSpec("d1", "digits", input_size=16, train_size=64),
        TaskSpec("d2", "digits", input_size=8, train_size=32),
    ]
    dm = TaskDataModule(specs, root="unused", batch_size=16)
    dm.setup()
    batches = list(iter(dm.train_dataloader()))
    assert len(batches) == 4  # the larger task sets the epoch; the smaller one cycles
    batch = batches[0]
    assert set(batch) == {"d1", "d2"}
    assert batch["d1"][0].shape == (16, 1, 16, 16) and batch["d2"][0].shape == (16, 1, 8, 8)
    assert len(dm.val_dataloader()) == 2
