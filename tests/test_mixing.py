"""Task mixing: each step loads only the batches it trains, an epoch is what data/mixing.py says, ranks
split the data as documented, and a run resumed mid-epoch continues the same order."""

import json
import logging
from collections import defaultdict
from types import SimpleNamespace

import pytest

from modelpatch.data.embedded import InMemoryDataset
from modelpatch.run import build, train
from tests.probe import Preempted

SIZES = {"fmnist_a": 64, "fmnist_b": 96, "digits": 160}  # 4, 6 and 10 batches of 16
MIX = [
    "task=multi",
    *(f"task.catalog.{t}.train_size={n}" for t, n in SIZES.items()),
    "task.catalog.fmnist_a.val_size=64",
    "task.catalog.fmnist_b.val_size=64",
    "++trainer.limit_train_batches=1.0",
    "patch=logits",  # cached features: fast steps; the loader is the same
    "test=false",
    "export_patches=false",
]
# mode -> (steps per epoch, batches each task trains per epoch)
EPOCHS = {
    "all": (10, {"fmnist_a": 10, "fmnist_b": 10, "digits": 10}),
    "round_robin": (30, {"fmnist_a": 10, "fmnist_b": 10, "digits": 10}),
    "proportional": (20, {"fmnist_a": 4, "fmnist_b": 6, "digits": 10}),
}


@pytest.fixture
def loads(monkeypatch):
    """Every batch an in-memory split loads: ``id(split) -> [indices, ...]``."""
    seen = defaultdict(list)
    getitems = InMemoryDataset.__getitems__

    def counting(self, indices):
        seen[id(self.split)].append(list(indices))
        return getitems(self, indices)

    monkeypatch.setattr(InMemoryDataset, "__getitems__", counting)
    return seen


def probe(tmp_path, **kwargs):
    args = [f"+callbacks.probe.{k}={v}" for k, v in kwargs.items()]
    return ["+callbacks.probe._target_=tests.probe.StepProbe", f"+callbacks.probe.out_dir={tmp_path / 'probe'}", *args]


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(EPOCHS))
def test_each_step_loads_only_the_batches_it_trains(make_cfg, tmp_path, fashion_mnist, loads, caplog, mode):
    caplog.set_level(logging.INFO, logger="modelpatch")
    _, objects = train(make_cfg(*MIX, f"task.mixing={mode}", "callbacks=none", *probe(tmp_path)))
    steps = json.loads((tmp_path / "probe" / "steps-rank0.json").read_text())
    epoch_steps, per_task = EPOCHS[mode]
    assert len(steps) == epoch_steps
    trained = {t: sum(t in s["tasks"] for s in steps) for t in SIZES}
    assert trained == per_task
    if mode != "all":
        assert all(len(s["tasks"]) == 1 for s in steps)
    data = objects["datamodule"].data
    for task, n in SIZES.items():
        batches = loads[id(data[task].train)]
        assert len(batches) == trained[task], task  # nothing loaded that was not trained
        seen = [i for b in batches for i in b]
        assert set(seen) == set(range(n)), task  # the whole training set, every epoch
        if trained[task] * 16 == n:
            assert sorted(seen) == list(range(n)), task  # exactly once where the epoch fits the task
    assert f"global batch 16; {epoch_steps} steps per epoch" in caplog.text


def test_round_robin_takes_turns_and_proportional_is_the_same_on_every_rank(make_cfg):
    datamodule, _ = build(make_cfg(*MIX, "task.mixing=round_robin"))
    sampler = datamodule.train_dataloader().sampler
    assert [s for s in sampler.schedule(0)[:4]] == [("fmnist_a",), ("fmnist_b",), ("digits",), ("fmnist_a",)]
    datamodule.mixing = build(make_cfg(*MIX, "task.mixing=proportional"))[0].mixing
    orders = []
    for rank in range(3):
        datamodule.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        orders.append(datamodule.train_dataloader().sampler.schedule(epoch=1))
    assert orders[0] == orders[1] == orders[2]
    assert orders[0] != datamodule.train_dataloader().sampler.schedule(epoch=0)  # reshuffled each epoch


@pytest.mark.parametrize(("world", "tasks"), [(3, ["fmnist_a", "fmnist_b", "digits"]), (4, ["fmnist_b", "digits"])])
def test_per_device_rank_loads_only_its_task_and_all_of_it(make_cfg, loads, world, tasks):
    datamodule, _ = build(make_cfg(*MIX, "task.mixing=per_device", f"task.tasks=[{','.join(tasks)}]"))
    lengths, shares = [], defaultdict(list)
    for rank in range(world):
        loads.clear()
        datamodule.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        loader = datamodule.train_dataloader()
        steps = list(loader)
        lengths.append(len(steps))
        own = tasks[rank % len(tasks)]
        assert all(list(s) == [own] for s in steps), rank
        splits = {id(datamodule.data[t].train): t for t in tasks}
        assert {splits[k] for k in loads} == {own}, rank  # no other task's data read
        group = world // len(tasks) if world % len(tasks) == 0 else None
        per_pass = -(-SIZES[own] // group // 16)  # this rank's batches of one pass over its share
        shares[own].append([i for b in loads[id(datamodule.data[own].train)][:per_pass] for i in b])
    assert len(set(lengths)) == 1  # every rank takes the same number of steps
    assert lengths[0] == max(-(-SIZES[t] // (world // len(tasks)) // 16) for t in tasks)
    for task, parts in shares.items():
        assert sorted(i for p in parts for i in p) == list(range(SIZES[task])), task  # all of it, split


@pytest.mark.slow
def test_resumed_mid_epoch_the_run_continues_the_same_order(make_cfg, tmp_path, fashion_mnist):
    common = [*MIX, "task.mixing=proportional", "trainer.max_epochs=2"]
    common.append("callbacks.model_checkpoint.every_n_train_steps=9")
    train(make_cfg(*common, *probe(tmp_path / "ref"), out="ref"))
    reference = json.loads((tmp_path / "ref" / "probe" / "steps-rank0.json").read_text())
    assert len(reference) == 40
    with pytest.raises(Preempted):
        train(make_cfg(*common, *probe(tmp_path, stop_at=27)))  # epoch 1, 7 steps in; last.ckpt at step 27
    train(make_cfg(*common, *probe(tmp_path, stop_at=27)))
    first = json.loads((tmp_path / "probe" / "steps-rank0.json").read_text())
    resumed = json.loads((tmp_path / "probe" / "steps-rank0-resumed.json").read_text())
    assert [s["step"] for s in first] == list(range(27)) and resumed[0]["step"] == 27
    assert first + resumed == reference


@pytest.mark.parametrize(
    ("size", "batches"),
    [
        (129, [16] * 8),  # one sample left: BatchNorm cannot train on it
        (135, [16] * 8),  # 7 left, under half a batch: a step of its own would be a loss spike
        (136, [16] * 8 + [8]),  # half a batch: a step of its own
        (10, [10]),  # under one batch: one step
    ],
)
def test_a_last_batch_under_half_a_batch_is_left_out_of_the_epoch(make_cfg, fashion_mnist, size, batches):
    """No batch exceeds the batch size; what is left out is a different few images each epoch."""
    cfg = make_cfg("task=fmnist_b", f"task.train_size={size}", "patch=bn", "++trainer.limit_train_batches=1.0",
                   *MIX[-2:])  # fmt: skip
    _, objects = train(cfg)
    sampler = objects["datamodule"].train_dataloader().sampler  # the trainer drops its loader when it re-validates
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append([i for step in sampler for i in step["fmnist_b"]])
        assert [len(step["fmnist_b"]) for step in sampler] == batches
        assert len(set(epochs[-1])) == sum(batches) and set(epochs[-1]) <= set(range(size))
    if sum(batches) < size:
        assert set(epochs[0]) != set(epochs[1])
    assert objects["trainer"].global_step == len(batches) * objects["trainer"].max_epochs
