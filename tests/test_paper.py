"""Every experiment under conf/experiment/paper/ composes and runs a few steps on tiny fixtures,
with pretrained weights files written under torchvision's exact names in a temporary TORCH_HOME."""

import json

import numpy as np
import pytest
import torch

from modelpatch.models.backbones import pretrained_weights_file
from modelpatch.run import train

from .fixtures_datasets import write_flowers102, write_imagenet, write_places365
from .support import CONF, reference_state_dict

RESOLUTIONS = (96, 128, 160, 192, 224)
CPU = ["backbone.width=1.0", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=1"]
PAPER = {
    "transfer_mobilenet_v2": (["task.input_size=32"], [write_flowers102]),
    "transfer_inception_v3": (["task.input_size=75"], [write_flowers102]),
    "multitask_imagenet_places": (
        ["trainer.strategy=auto", "task.mixing=all"]
        + [f"task.catalog.{t}.{k}" for t in ("imagenet", "places365") for k in ("input_size=32", "val_size=1")],
        [write_imagenet, write_places365],
    ),
    "detector_to_classifier": (["task.input_size=32", "task.val_size=1"], [write_imagenet]),
    "multires_imagenet": ([f"task.catalog.imagenet_{r}.val_size=1" for r in RESOLUTIONS], [write_imagenet]),
}


def test_every_paper_experiment_is_covered():
    assert sorted(p.stem for p in (CONF / "experiment" / "paper").glob("*.yaml")) == sorted(PAPER)


pytestmark = pytest.mark.usefixtures("no_md5")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_experiment_runs_a_few_steps(make_cfg, tmp_path, monkeypatch, name):
    overrides, writers = PAPER[name]
    data = tmp_path / "data"
    for write in writers:
        write(data, np.random.default_rng(0))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = make_cfg(f"experiment=paper/{name}", *CPU, *overrides, f"data.root={data}", "++trainer.limit_train_batches=1")
    weights = pretrained_weights_file(cfg.backbone.name)
    weights.parent.mkdir(parents=True)
    torch.save(reference_state_dict(cfg.backbone.name), weights)
    _, objects = train(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["backbone"]["weights"] == cfg.backbone.weights
    assert set(results["tasks"]) == set(objects["model"].task_names)
    assert all(0.0 <= t["test_acc"] <= 1.0 for t in results["tasks"].values())
