"""Data-parallel training: the DDP settings come from the mixing, N ranks make the update one process
makes with their global batch, and per-task statistics are synced before any checkpoint is written."""

import json
import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf
from safetensors.torch import load_file

from modelpatch.config import ConfigError
from modelpatch.data import make_mixing
from modelpatch.run import build, train
from modelpatch.training.distributed import ddp_strategy

from .support import ROOT, TINY, assert_close_scaled, largest_magnitude

TASKS = ["fmnist_a", "fmnist_b", "digits"]
MIX = [
    "task=multi",
    *(f"task.catalog.{t}.train_size=96" for t in TASKS),
    "task.catalog.fmnist_a.val_size=64",
    "task.catalog.fmnist_b.val_size=64",
]
QUICK = ["test=false", "export_patches=false"]
# a checkpoint after every 2nd step, each in its own file (last.ckpt is also written after validation)
EVERY_2 = [
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.filename='step{step}'",
]
DDP = "lightning.pytorch.strategies.DDPStrategy"


def run_ranks(tmp_path, data_dir, name: str, devices: int, *overrides: str):
    """``train.py`` in a subprocess with ``devices`` CPU ranks (plain ``trainer.strategy=ddp``) and a
    ``StepProbe`` (dropout off); returns the run folder and the process output."""
    out = tmp_path / name
    base = [o for o in TINY if not o.startswith(("trainer.devices", "trainer.accelerator"))]
    cmd = [
        sys.executable, str(ROOT / "train.py"), *base, "trainer.accelerator=cpu", f"trainer.devices={devices}",
        "trainer.strategy=ddp", f"hydra.run.dir={out}", f"paths.data_dir={data_dir}",
        "+callbacks.probe._target_=tests.probe.StepProbe", f"+callbacks.probe.out_dir={out / 'probe'}",
        "+callbacks.probe.no_dropout=true", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout + proc.stderr


def run_one(make_cfg, tmp_path, *overrides: str):
    """The same in this process, on one device, with the ranks' one thread (another thread count sums in
    another order: differences of ~1e-5 relative)."""
    one = tmp_path / "one"
    probe = ["+callbacks.probe._target_=tests.probe.StepProbe", f"+callbacks.probe.out_dir={one / 'probe'}"]
    threads = torch.get_num_threads()
    try:
        train(make_cfg(*overrides, *probe, "+callbacks.probe.no_dropout=true", "threads=1", out="one"))
    finally:
        torch.set_num_threads(threads)  # the rest of the suite keeps its threads
    return one


def probe_file(out, kind: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(out / "probe" / f"{kind}-rank{rank}.safetensors")


def test_ddp_settings_come_from_the_mixing(make_cfg):
    cfg = make_cfg(*MIX, "task.mixing=round_robin", "trainer.strategy=ddp")
    strategy = ddp_strategy(cfg.trainer, make_mixing("round_robin"), TASKS)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {"find_unused_parameters": True, "broadcast_buffers": False}
    assert ddp_strategy(cfg.trainer, make_mixing("all"), TASKS)._ddp_kwargs["find_unused_parameters"] is False
    assert ddp_strategy(make_cfg("trainer.strategy=auto").trainer, make_mixing("all"), TASKS) is None  # 1 device
    several = make_cfg("trainer.strategy=auto", "trainer.devices=3").trainer
    assert ddp_strategy(several, make_mixing("per_device"), TASKS)._ddp_kwargs["broadcast_buffers"] is False
    wrong = OmegaConf.create({"strategy": {"_target_": DDP, "broadcast_buffers": True}, "devices": 2})
    with pytest.raises(ConfigError, match=r"trainer\.strategy\.broadcast_buffers=True breaks .*drop the override"):
        ddp_strategy(wrong, make_mixing("all"), TASKS)
    given = OmegaConf.create({"strategy": {"_target_": DDP, "static_graph": False}, "devices": 2})
    strategy = ddp_strategy(given, make_mixing("per_device"), TASKS)
    assert strategy._ddp_kwargs == {"static_graph": False, "find_unused_parameters": True, "broadcast_buffers": False}
    told = make_cfg("trainer.strategy=ddp_find_unused_parameters_false").trainer
    with pytest.raises(ConfigError, match=r"use trainer\.strategy=ddp$"):
        ddp_strategy(told, make_mixing("proportional"), TASKS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["patch=logits"], r"trainer\.sync_batchnorm=true .* patch\.norm_stats=frozen never computes them"),
        (["task.mixing=per_device"], r"pool the BatchNorm statistics of different tasks"),
    ],
)
def test_sync_batchnorm_that_cannot_work_is_refused_before_reading_data(make_cfg, overrides, message):
    cfg = make_cfg(*MIX, "trainer.sync_batchnorm=true", "data.root=/nonexistent", *overrides)
    with pytest.raises(ConfigError, match=message):
        build(cfg)


@pytest.mark.slow
def test_ranks_make_the_first_update_of_one_process_with_their_global_batch(
    make_cfg, tmp_path, data_dir, trained_source
):
    common = [
        *MIX,
        "task.tasks=[fmnist_b,digits]",
        "patch=bn",
        "patch.norm_stats=frozen",
        f"backbone.weights={trained_source}",
    ]
    common += [
        *QUICK,
        "++trainer.max_steps=1",
        "callbacks=none",
        "optimized_metric=null",
        "++trainer.limit_val_batches=0",
    ]
    one = run_one(make_cfg, tmp_path, *common, "data.batch_size=48")
    out, log = run_ranks(tmp_path, data_dir, "three", 3, *common, "data.batch_size=16")
    assert log.count("3 rank(s) x batch 16 per task and step = global batch 48; 2 steps per epoch") == 1
    expected = probe_file(one, "grads")
    assert any(k.startswith("model.patches.digits") for k in expected) and any(k.startswith("heads.") for k in expected)
    for rank in range(3):
        grads = probe_file(out, "grads", rank)
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name
            assert_close_scaled(grad, expected[name], rtol=1e-4, msg=name, scale=largest_magnitude(expected))


@pytest.mark.slow
def test_checkpoints_hold_the_statistics_averaged_over_ranks(tmp_path, data_dir, trained_source):
    out, _ = run_ranks(
        tmp_path, data_dir, "rr", 3, *MIX, "task.mixing=round_robin", "patch=bn", f"backbone.weights={trained_source}",
        *QUICK, *EVERY_2, "+callbacks.probe.stats_at=2",
        "+callbacks.digest._target_=tests.probe.DDPProbe", f"+callbacks.digest.out_dir={tmp_path / 'rr' / 'digest'}",
    )  # fmt: skip
    ckpt = torch.load(out / "checkpoints" / "step2.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2  # mid-epoch: 3 steps an epoch
    ranks = [probe_file(out, "stats", r) for r in range(3)]
    trained = [k for k in ranks[0] if k.startswith(("model.patches.fmnist_a.", "model.patches.fmnist_b."))]
    assert any(not torch.equal(ranks[0][k], ranks[1][k]) for k in trained if "running" in k)  # ranks differ
    for key in ranks[0]:
        if ranks[0][key].is_floating_point():
            mean = sum(r[key] for r in ranks) / 3
            assert_close_scaled(ckpt["state_dict"][key], mean, rtol=1e-5, msg=key)
    digests = [json.loads((tmp_path / "rr" / "digest" / f"rank{r}.json").read_text()) for r in range(3)]
    assert digests[0]["patches"] == digests[1]["patches"] == digests[2]["patches"]  # after training too


@pytest.mark.slow
def test_per_device_gradients_and_statistics_are_each_tasks_own(make_cfg, tmp_path, data_dir, trained_source):
    common = [*MIX, "patch=bn", f"backbone.weights={trained_source}", *QUICK]
    first_step = ["++trainer.max_steps=1", "callbacks=none", "optimized_metric=null", "++trainer.limit_val_batches=0"]
    one = run_one(make_cfg, tmp_path, *common, *first_step)  # every task's first batch, in one process
    out, _ = run_ranks(
        tmp_path, data_dir, "pd", 3, *common, "task.mixing=per_device",
        *EVERY_2, "+callbacks.probe.stats_at=2",
    )  # fmt: skip
    for rank, task in enumerate(TASKS):
        steps = json.loads((out / "probe" / f"steps-rank{rank}.json").read_text())
        assert all(list(s["tasks"]) == [task] for s in steps)  # rank r loaded task r only
    expected = probe_file(one, "grads")
    grads = probe_file(out, "grads", 0)
    for task in TASKS:
        own = [k for k in expected if k.startswith((f"model.patches.{task}.", f"heads.{task}."))]
        assert own
        for name in own:
            assert_close_scaled(grads[name], expected[name], rtol=1e-4, msg=name, scale=largest_magnitude(expected))
    ckpt = torch.load(out / "checkpoints" / "step2.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    for rank, task in enumerate(TASKS):
        stats = probe_file(out, "stats", rank)
        for key in (k for k in stats if k.startswith(f"model.patches.{task}.") and "running" in k):
            torch.testing.assert_close(ckpt["state_dict"][key], stats[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_per_device_ranks_sharing_a_task_split_it_and_average_its_gradient(
    make_cfg, tmp_path, data_dir, trained_source
):
    """4 ranks, 2 tasks: each task is split over its 2 ranks only; their mean gradient is the one-process
    gradient at twice the batch (frozen statistics: a rank's BatchNorm batch statistics would differ)."""
    common = [*MIX, "task.tasks=[fmnist_b,digits]", "patch=bn", "patch.norm_stats=frozen"]
    common += [f"backbone.weights={trained_source}", *QUICK, "++trainer.max_steps=1", "callbacks=none"]
    common += ["optimized_metric=null", "++trainer.limit_val_batches=0"]
    one = run_one(make_cfg, tmp_path, *common, "data.batch_size=32")
    out, log = run_ranks(tmp_path, data_dir, "four", 4, *common, "task.mixing=per_device", "data.batch_size=16")
    assert "4 rank(s) x batch 16 per task and step = global batch 32; 3 steps per epoch" in log  # 96 / 2 / 16
    for rank, task in enumerate(["fmnist_b", "digits", "fmnist_b", "digits"]):
        steps = json.loads((out / "probe" / f"steps-rank{rank}.json").read_text())
        assert [list(s["tasks"]) for s in steps] == [[task]]
    expected, grads = probe_file(one, "grads"), probe_file(out, "grads", 3)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert_close_scaled(grad, expected[name], rtol=1e-4, msg=name, scale=largest_magnitude(expected))
