"""The numbers a run reports (results.json, the optimized metric, W&B's summary) are those of the model it
tests and exports, the best checkpoint, even when the last epoch is worse."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from modelpatch.run import get_metric_value, train

from .support import DIGITS


class ForceEpochAccuracies(Callback):
    """Before each epoch's validation, make every head predict one class: the most frequent validation class
    in the first epoch, the least frequent one after. The first epoch is then the best, by a margin known
    from the labels, and each checkpoint holds the head that was validated."""

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.state.fn != "fit":
            return
        for task, head in pl_module.heads.items():
            counts = torch.bincount(trainer.datamodule.data[task].val.labels, minlength=head.out_features)
            target = int(counts.argmax() if trainer.current_epoch == 0 else counts.argmin())
            with torch.no_grad():
                head.weight.zero_()
                head.bias.fill_(-10.0)[target] = 10.0


def test_results_and_optimized_metric_are_the_tested_checkpoints(make_cfg, tmp_path):
    cfg = make_cfg(
        *DIGITS, "patch=bn", "trainer.max_epochs=3", "++trainer.limit_val_batches=1.0", "logger=csv",
        f"+callbacks.force._target_={__name__}.ForceEpochAccuracies",
    )  # fmt: skip
    metrics, objects = train(cfg)
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    epochs = [r for r in rows if r.get("val/acc") and r.get("epoch") and r.get("val/acc_best")][:3]
    val = [float(r["val/acc"]) for r in epochs]
    assert len(val) == 3 and val[0] > val[1] == val[2], val  # the first epoch is the best
    best_epoch, best = 0, epochs[0]
    # best so far, every epoch
    assert [float(r["val/acc_best"]) for r in epochs] == pytest.approx([max(val[: i + 1]) for i in range(3)])
    # results.json and the sweeper's number: the best epoch's, which is the tested checkpoint's
    assert results["checkpoint"].endswith("best.ckpt")
    assert results["val_acc"] == pytest.approx(float(best["val/acc"]), abs=1e-6)
    assert results["tasks"]["digits"]["val_acc"] == pytest.approx(float(best["val/digits/acc"]), abs=1e-6)
    assert cfg.optimized_metric == "val/acc_best"
    assert get_metric_value(metrics, cfg.optimized_metric) == pytest.approx(results["val_acc"], abs=1e-6)
    # the tested and exported model is best.ckpt's (the first epoch's head), not the last epoch's
    ckpt = torch.load(results["checkpoint"], weights_only=True)
    assert ckpt["epoch"] == best_epoch
    exported = load_file(results["patch_files"]["digits"])["head.bias"]
    assert torch.equal(exported, ckpt["state_dict"]["heads.digits.bias"])
    counts = torch.bincount(objects["datamodule"].data["digits"].val.labels, minlength=10)
    assert int(exported.argmax()) == int(counts.argmax()) != int(counts.argmin())
    # while last.ckpt, what a resumed run starts from, is the latest state (not the best epoch's)
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, objects["trainer"].global_step)
    assert int(last["state_dict"]["heads.digits.bias"].argmax()) == int(counts.argmin())
