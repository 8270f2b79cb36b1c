"""``optim.lr=auto``: Lightning's learning-rate finder picks every group's rate before training, from the run's
starting weights; results.json records it; a resumed run keeps the rate it started with."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from modelpatch.config import ConfigError
from modelpatch.run import train
from modelpatch.training import lr_find
from modelpatch.training.lr_find import choose_lr, steepest_fall

from .support import DIGITS


def test_the_rate_is_where_the_loss_falls_fastest_against_its_log():
    lrs = [1e-6 * 10 ** (6 * i / 99) for i in range(100)]  # the finder's exponential grid
    # a loss that falls fastest (in log rate) at 1e-2: a logistic step centred there
    losses = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 2))) for lr in lrs]
    assert steepest_fall(lrs, losses) == pytest.approx(1e-2, rel=0.15)
    assert steepest_fall(lrs[:12], losses[:12]) is None  # under 3 points once 10 + 1 are left out
    assert steepest_fall(lrs, [float("nan")] * 100) is None


class FirstWeights(Callback):
    """The model's weights as its training starts (``+callbacks.first._target_=``)."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_auto_trains_at_the_found_rate_from_the_starting_weights(make_cfg, tmp_path, monkeypatch):
    before = {}

    real = lr_find.find_lr

    def find_lr(cfg, model, datamodule):  # the weights the finder is given
        before.update({k: v.clone() for k, v in model.state_dict().items()})
        return real(cfg, model, datamodule)

    monkeypatch.setattr(lr_find, "find_lr", find_lr)
    cfg = make_cfg(*DIGITS, "patch=bn", "optim.lr=auto", f"+callbacks.first._target_={__name__}.FirstWeights")
    _, objects = train(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    found = results["lr_find"]
    assert 1e-6 <= found["lr"] <= 1.0 and found["steps"] > 20
    assert results["lr"] == {"patch": found["lr"], "head": found["lr"]}
    trainer = objects["trainer"]
    assert trainer.global_step == 3  # the finder's steps are not the run's
    (first,) = [c.weights for c in trainer.callbacks if isinstance(c, FirstWeights)]
    assert first.keys() == before.keys() and all(torch.equal(first[k], before[k]) for k in before)
    groups = trainer.optimizers[0].param_groups
    assert {g["name"]: g["initial_lr"] for g in groups} == {"patch": found["lr"], "head": found["lr"]}
    assert objects["model"].hparams["optim"]["patch_lr"] == found["lr"]  # what a resumed run reads


def test_a_resumed_auto_run_keeps_the_rate_it_started_with(make_cfg, tmp_path):
    train(make_cfg(*DIGITS, "patch=bn", "optim.lr=auto", "test=false"))
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    _, objects = train(make_cfg(*DIGITS, "patch=bn", "optim.lr=auto", "test=false", "trainer.max_epochs=2"))
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert objects["trainer"].global_step == 6  # resumed: 3 more steps
    assert again["lr_find"] is None and again["lr"]["patch"] == first["lr_find"]["lr"]


def test_auto_on_several_devices_says_what_to_do():
    trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match=r"optim.lr=auto .* one device.*lr_find\.lr"):
        choose_lr(None, None, None, trainer, None)


def test_a_rate_that_is_neither_a_number_nor_auto_is_refused_early(make_cfg):
    from modelpatch.run import check_config

    with pytest.raises(ConfigError, match=r"optim\.lr='fast'.*auto"):
        check_config(make_cfg(*DIGITS, "optim.lr=fast"))
