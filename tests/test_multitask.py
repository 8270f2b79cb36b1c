"""Multi-task learning: K tasks on one backbone, task mixing, DDP, adding a task to a trained model."""

import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from modelpatch.config import ConfigError
from modelpatch.data import TaskError
from modelpatch.data.mixing import tasks_per_rank
from modelpatch.run import build, train
from modelpatch.training.checkpoints import CheckpointMismatchError
from modelpatch.training.metrics import TaskTrainStats

from .support import ROOT, SMALL_MIX, TINY


@pytest.mark.parametrize("patch", ["bn", "bn+dw", "logits"])
def test_multi_trains_and_tests_every_task(make_cfg, tmp_path, fashion_mnist, patch):
    metrics, objects = train(make_cfg(*SMALL_MIX, f"patch={patch}"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["tasks"]) == ["fmnist_a", "fmnist_b", "digits"]
    counts = objects["model"].parameter_counts()
    for name, task in results["tasks"].items():
        assert task["test_acc"] == metrics[f"test/{name}/acc"]
        assert task["params_patch"] == counts[f"{name}/patch"] and task["params_head"] == counts[f"{name}/head"]
    params = results["params"]
    per_task = sum(t["params_patch"] + t["params_head"] for t in results["tasks"].values())
    assert params["total"] == params["shared"] + per_task
    assert params["ratio_vs_separate"] == pytest.approx(params["total"] / params["separate_models"], abs=1e-4)
    assert params["ratio_vs_separate"] < 0.5  # three tasks for much less than three networks
    assert results["test_acc"] == pytest.approx(sum(metrics[f"test/{t}/acc"] for t in results["tasks"]) / 3, abs=1e-6)


def test_per_device_assignment_and_undiluted_gradient_scale(make_cfg):
    assert tasks_per_rank(["a", "b"], 2) == ["a", "b"]
    assert tasks_per_rank(["a", "b"], 3) == ["a", "b", "a"]
    with pytest.raises(ValueError, match=r"needs trainer\.devices >= 3"):
        tasks_per_rank(["a", "b", "c"], 2)
    _, model = build(make_cfg(*SMALL_MIX, "task.mixing=per_device", "task.tasks=[fmnist_b,digits]"))
    model._trainer = SimpleNamespace(global_step=0, world_size=3, global_rank=2)
    # DDP divides by 3 ranks, fmnist_b is on 2 of them, digits on 1.
    assert model.loss_scale("fmnist_b") == 1.5 and model.loss_scale("digits") == 3.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.tasks=[]"], "the task mix is empty"),
        (["task.tasks=[digits,digits]"], "more than once: digits"),
        (["task.tasks=[digits,mnist]"], "unknown task.*mnist; known tasks: cifar10"),
    ],
)
def test_bad_mixes_are_refused(make_cfg, overrides, message):
    with pytest.raises(TaskError, match=message):
        train(make_cfg("task=multi", *overrides))


def test_adding_a_task_leaves_old_predictions_bit_for_bit(make_cfg, tmp_path):
    old_cfg = make_cfg(*SMALL_MIX, "task.tasks=[fmnist_b,digits]", "patch=bn", out="old")
    _, old = train(old_cfg)
    best = old["trainer"].checkpoint_callback.best_model_path
    old_results = json.loads((tmp_path / "old" / "results.json").read_text())

    _, new = train(make_cfg("task=fmnist_a", "task.train_size=64", "task.val_size=64", "patch=bn", f"init_from={best}"))
    new_model, data = new["model"].eval(), new["datamodule"].data
    assert new_model.frozen_tasks == {"fmnist_b", "digits"} and new_model.task_names[0] == "fmnist_a"
    old_model = old["model"].eval()
    with torch.no_grad():
        for task in ("fmnist_b", "digits"):
            images = data[task].test.images[:256]
            assert torch.equal(new_model(images, task), old_model(images, task)), task
    new_results = json.loads((tmp_path / "run" / "results.json").read_text())
    for task in ("fmnist_b", "digits"):
        assert new_results["tasks"][task]["frozen"] is True
        assert new_results["tasks"][task]["test_acc"] == old_results["tasks"][task]["test_acc"]
    assert (
        new_results["params"]["trainable"]
        == new_results["tasks"]["fmnist_a"]["params_patch"] + (new_results["tasks"]["fmnist_a"]["params_head"])
    )


def test_checkpoints_that_do_not_fit_are_refused(make_cfg, tmp_path):
    train(make_cfg("task=digits", "task.train_size=64", "patch=bn", out="old"))
    ckpt = tmp_path / "old" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="patch=bn in the checkpoint but dw here"):
        build(make_cfg("task=fmnist_b", "patch=dw", f"init_from={ckpt}"))
    wrong_head = r"wrong shape: .*heads\.digits\.weight \(10, 1280\) vs \(3, 1280\)"
    with pytest.raises(CheckpointMismatchError, match=wrong_head):
        build(make_cfg("task=digits", "task.classes=[0,1,2]", "patch=bn", f"init_from={ckpt}"))
    with pytest.raises(ConfigError, match="train_shared=true would change the outputs of the loaded tasks"):
        build(make_cfg("task=fmnist_b", "patch=bn", "patch.train_shared=true", f"init_from={ckpt}"))


@pytest.mark.slow
@pytest.mark.parametrize("mixing", ["all", "per_device"])
def test_ddp_two_processes_train_every_task_in_sync(tmp_path, data_dir, fashion_mnist, mixing):
    out, probe = tmp_path / "run", tmp_path / "probe"
    overrides = [o for o in TINY if not o.startswith(("trainer.devices", "trainer.accelerator", "logger="))]
    cmd = [
        sys.executable, str(ROOT / "train.py"), *overrides, *SMALL_MIX[:4],
        "task.tasks=[fmnist_b,digits]", f"task.mixing={mixing}", "patch=bn", "patch.train_shared=true",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"hydra.run.dir={out}", f"paths.data_dir={data_dir}",
        "+callbacks.probe._target_=tests.probe.DDPProbe", f"+callbacks.probe.out_dir={probe}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["grads"] == {t: {"patch": True, "head": True} for t in ("fmnist_b", "digits")}
    for part in ("shared", "patches", "heads"):
        assert ranks[0][part] == ranks[1][part], part
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"fmnist_b", "digits"}


def test_train_stats_are_each_tasks_epoch_mean():
    stats = TaskTrainStats(2)
    stats.update(torch.tensor(1.0), torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), 0)
    stats.update(torch.tensor(4.0), torch.tensor([2, 2]), torch.tensor([2, 2]), 0)
    loss, acc, seen = stats.compute()
    assert loss[0] == pytest.approx((1.0 * 4 + 4.0 * 2) / 6) and acc[0] == pytest.approx(5 / 6)
    assert seen.tolist() == [6, 0] and loss[1] == 0 and acc[1] == 0


def test_training_metrics_are_logged_once_per_epoch_for_each_task(make_cfg, tmp_path, fashion_mnist):
    cfg = make_cfg(*SMALL_MIX, "task.tasks=[fmnist_b,digits]", "patch=bn", "trainer.max_epochs=2", "logger=csv")
    train(cfg)
    (metrics_csv,) = (tmp_path / "run").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    for task in ("fmnist_b", "digits"):
        for key in (f"train/{task}/loss", f"train/{task}/acc"):
            values = [float(r[key]) for r in rows if r.get(key)]
            assert len(values) == 2, key  # one per epoch
            assert all(v >= 0 for v in values) and (key.endswith("loss") or all(v <= 1 for v in values))
    assert not any(r.get("train/loss") for r in rows)  # 3 steps < log_every_n_steps and no progress bar


@pytest.mark.parametrize(
    ("bar", "every", "logged"), [(False, 10, [9, 19]), (False, 0, []), (True, 10, list(range(25)))]
)
def test_step_loss_is_logged_on_the_steps_loggers_write(make_cfg, bar, every, logged):
    """Lightning writes logs when (optimizer steps + 1) % log_every_n_steps == 0, across epochs."""
    _, model = build(make_cfg("task=digits", "task.train_size=64"))
    steps = []
    for step in range(25):
        model._trainer = SimpleNamespace(global_step=step, log_every_n_steps=every, progress_bar_callback=bar or None)
        if model._log_step_loss():
            steps.append(step)
    assert steps == logged
