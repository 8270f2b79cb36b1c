"""Faults: ``train.py`` killed (SIGKILL) at points the test chooses and started again in the same folder ends
as the run that was never interrupted, bit for bit (weights, statistics, optimizer, metrics.csv, results,
patches); an unreadable checkpoint is passed over (and kept) for the newest readable one."""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from modelpatch.config import ConfigError
from modelpatch.data.steps import Step, StepDataset, seeded
from modelpatch.training.csv_log import ContinuedWriter
from modelpatch.training.resume import check_resume, choose_resume, read_resumable, resume_candidates, resume_path

from .faults import checkpoint_state, finish_reference, run_killed, run_state, start_reference
from .support import CLI_TINY, SMALL_MIX

REPLACED = ("trainer.max_epochs", "trainer.limit_train_batches", "data.num_workers")
BASE = [o for o in CLI_TINY if o.lstrip("+").split("=")[0] not in REPLACED and not o.startswith("task")]


def args_for(data_dir, source, *overrides: str) -> list[str]:
    return [*BASE, f"paths.data_dir={data_dir}", "patch=bn", f"backbone.weights={source}", *overrides]


def assert_same_run(killed: dict, reference: dict) -> None:
    for key in ("last", "best", "patches", "accuracies"):
        assert killed[key] == reference[key], key
    assert len(killed["metrics"]) == len(reference["metrics"])
    for i, (row, expected) in enumerate(zip(killed["metrics"], reference["metrics"], strict=True)):
        assert row == expected, f"metrics.csv row {i}"


# Single task, a checkpoint every 2 steps (mid-epoch resumes), augmentation drawn in 2 DataLoader workers:
# 3 epochs of 4 steps. Killed in the validation after step 3 (epoch 0's: resumed from step 2), halfway through
# writing last.ckpt at step 10, and in the test after training (resumed after the final checkpoint: Lightning
# skips training); then last.ckpt is cut in half before the last start. (An epoch's start: bench/resume_exact.py.)
SINGLE = [
    "task=fmnist_b", "task.train_size=128", "+task.augment=true", "data.num_workers=2",
    "trainer.max_epochs=3", "++trainer.limit_train_batches=4", "callbacks.model_checkpoint.every_n_train_steps=2",
    # one rate, 0.05 (not bn's 0.1): here the best checkpoint is then not the final one, so the last start trains
    # on from it (where it is the final one, the start resumes at the end:
    # test_a_run_resumed_at_its_end_from_another_checkpoint_leaves_a_last_checkpoint)
    "optim.patch_lr=null", "optim.head_lr=null",
]  # fmt: skip
SINGLE_KILLS = [("validation", 3), ("checkpoint_write", 10), ("test", 0)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_run(tmp_path, data_dir, trained_source):
    args = args_for(data_dir, trained_source, *SINGLE)
    reference = tmp_path / "reference"
    uninterrupted = start_reference(reference, args)

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"

    def before_restart(restart: int) -> None:
        if restart == 2:  # the write killed halfway left a temporary file; last.ckpt is the one before, whole
            assert [p.name.split(".")[1:3] for p in last.parent.glob(".*.tmp")] == [["last", "ckpt"]]
            assert read_resumable(last)["global_step"] == 8
        if restart == 3:
            assert read_resumable(last)["global_step"] == 12  # the final one
            with open(last, "r+b") as f:  # what a writer that is not atomic leaves when killed
                f.truncate(last.stat().st_size // 2)

    logs = run_killed(killed, args, SINGLE_KILLS, before_restart=before_restart)
    finish_reference(uninterrupted)
    assert_same_run(run_state(killed), run_state(reference))
    for i, log in enumerate(logs[1:], 1):
        assert "resuming from" in log, f"attempt {i} did not resume"
    assert "a checkpoint a killed process left half-written" in logs[2]
    assert not list(last.parent.glob(".*.tmp"))
    assert f"cannot resume from {last}: unreadable" in logs[-1]
    assert f"resuming from {last.parent / 'best.ckpt'} instead" in logs[-1]
    kept = last.parent / "last.ckpt.unreadable"
    assert kept.is_file() and kept.stat().st_size > 0  # never deleted


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_multitask_ddp_run_killed_on_every_rank_resumes_to_the_uninterrupted_run(tmp_path, data_dir, trained_source):
    """Three tasks a step (task=multi) on two CPU ranks, one thread each (2 epochs of 2 steps), a checkpoint every
    step; every rank killed inside step 3 (after 3 steps), between two tasks' forward passes (resumed
    mid-epoch)."""
    args = args_for(
        data_dir, trained_source, *SMALL_MIX, "trainer.max_epochs=2", "++trainer.limit_train_batches=4",
        "trainer.devices=2", "trainer.strategy=ddp", "callbacks.model_checkpoint.every_n_train_steps=1",
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    uninterrupted = start_reference(reference, args, env=env)
    killed = tmp_path / "killed"
    run_killed(killed, args, [("between_tasks", 3)], env=env)
    finish_reference(uninterrupted)
    state = run_state(killed)
    assert len(state["accuracies"]) == 3 and len(state["patches"]) == 3
    assert_same_run(state, run_state(reference))


def write_checkpoint_dir(make_cfg, tmp_path):
    """A finished tiny run's config and its checkpoint folder (last.ckpt and best.ckpt)."""
    from modelpatch.run import train

    cfg = make_cfg("task=digits", "task.train_size=64", "trainer.max_epochs=2")
    train(cfg)
    return cfg, tmp_path / "run" / "checkpoints"


def test_an_unreadable_last_checkpoint_is_passed_over_for_the_newest_readable_one(make_cfg, tmp_path):
    cfg, folder = write_checkpoint_dir(make_cfg, tmp_path)
    last, best = folder / "last.ckpt", folder / "best.ckpt"
    step = folder / "epoch0.ckpt"
    step.write_bytes(last.read_bytes())
    os.utime(step, (1, 1))  # older than any other
    newer = folder / "epoch1.ckpt"
    torch.save({"state_dict": {}}, newer)  # weights only: no training state
    assert resume_candidates(folder) == [last, newer, step, best]

    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 2)
    with pytest.raises(ValueError, match="unreadable"):
        read_resumable(last)
    with pytest.raises(ValueError, match="no training state"):
        read_resumable(newer)
    choice = choose_resume(cfg)
    assert choice.path == step and [p for p, _ in choice.unreadable] == [last, newer]
    host = socket.gethostname()
    dead = folder / f".last.ckpt.4194304@{host}.tmp"  # above any pid_max
    # alive: the parent's pid (this process's own is the temporary file of the last.ckpt that resume_path copies)
    alive, elsewhere = folder / f".last.ckpt.{os.getppid()}@{host}.tmp", folder / f".last.ckpt.4194304@x{host}.tmp"
    for tmp in (dead, alive, elsewhere):
        tmp.write_bytes(b"half")
    assert resume_path(cfg, set_aside=False) == str(step)
    assert dead.exists() and last.exists()  # untouched by a process that does not set aside
    # another option changed (extending the run) is checked against the readable checkpoint, not the raw error
    cfg.trainer.max_epochs = 5
    check_resume(cfg)
    cfg.optim.patch_lr = 0.5
    with pytest.raises(ConfigError, match=r"cannot resume from .*epoch0\.ckpt.*optim\.patch_lr"):
        check_resume(cfg)

    assert resume_path(cfg) == str(last)  # step's copy: the newest state, until the next save
    assert not dead.exists() and alive.exists() and elsewhere.exists()  # running, or another machine's: kept
    assert not newer.exists() and last.read_bytes() == step.read_bytes()
    assert (folder / "last.ckpt.unreadable").is_file() and (folder / "epoch1.ckpt.unreadable").is_file()

    for path in (last, step, best):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"no readable checkpoint .*They are kept; run with resume=false"):
        check_resume(cfg)
    assert all(p.exists() for p in (last, step, best))


def test_a_run_resumed_at_its_end_from_another_checkpoint_leaves_a_last_checkpoint(make_cfg, tmp_path):
    """last.ckpt cut short after the final step, the final state readable only as best.ckpt: the run restarts at
    its end (Lightning trains no step, so writes no checkpoint) and still ends with last.ckpt, the final state;
    its wall time counts the first process's, up to that checkpoint."""
    from modelpatch.run import train

    cfg, folder = write_checkpoint_dir(make_cfg, tmp_path)
    last, best = folder / "last.ckpt", folder / "best.ckpt"
    final = checkpoint_state(last)
    earlier_s = torch.load(last, weights_only=True)["callbacks"]["ResumeState"]["elapsed_s"]
    best.write_bytes(last.read_bytes())
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 2)
    train(cfg)
    assert checkpoint_state(last) == final
    assert (folder / "last.ckpt.unreadable").is_file()
    assert json.loads((folder.parent / "results.json").read_text())["wall_time_s"] >= round(earlier_s, 2) > 0


def test_the_csv_log_is_continued_and_cut_back_to_the_checkpoints_rows(tmp_path):
    writer = ContinuedWriter(str(tmp_path))
    writer.log_metrics({"a": 1.0}, step=0)
    writer.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    assert writer.rows_written() == 2
    with open(writer.metrics_file_path, "a") as f:
        f.write("4.0,5")  # a row cut by a kill
    again = ContinuedWriter(str(tmp_path))  # a restarted run: the file is kept
    assert again.metrics_keys == ["a", "b", "step"]
    again.keep_rows(2)
    again.log_metrics({"b": 6.0}, step=2)
    again.save()
    lines = Path(again.metrics_file_path).read_text().splitlines()
    assert lines == ["a,b,step", "1.0,,0", "2.0,3.0,1", ",6.0,2"]


class Noisy(torch.utils.data.Dataset):
    """Each item draws from torch's, numpy's and Python's generators (as augmentation does)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import random

        import numpy as np

        return torch.tensor([i, torch.rand(()).item(), np.random.rand(), random.random()])


def test_what_a_step_draws_while_loading_depends_on_the_step_alone(tmp_path):
    steps = [Step({"t": [0, 1]}, seed=11), Step({"t": [2, 3]}, seed=12), Step({"t": [0, 1]}, seed=13)]
    assert pickle.loads(pickle.dumps(steps[0])).seed == 11
    dataset = StepDataset({"t": Noisy()})

    def load(workers: int, order: list[Step]) -> list[torch.Tensor]:
        loader = DataLoader(dataset, sampler=order, batch_size=None, num_workers=workers)
        return [batch["t"][0] for batch in loader]

    torch.manual_seed(0)
    in_process = load(0, steps)
    assert not torch.equal(in_process[0], in_process[2])  # the same indices, another step: other draws
    torch.manual_seed(1)
    assert all(map(torch.equal, load(2, steps), in_process))  # in workers, from another global state
    assert torch.equal(load(0, steps[2:])[0], in_process[2])  # resumed at step 2
    before = torch.get_rng_state()
    with seeded(5):
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
