"""Sweeps without a W&B server: W&B's engine suggests, a Hydra launcher runs train.py, results.json answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from modelpatch.sweeps.folder import (
    RUN_FILE,
    drive,
    init_sweep,
    load_sweep_file,
    metric_value,
    read_runs,
    read_sweep,
    seed_engine,
)
from modelpatch.sweeps.overrides import SweepError

from .support import BAYES, CLI_TINY, train_py, write_sweep
from .wandb_offline import read_offline_run


def fake_launch(folder: Path, objective):
    """A launcher that 'trains' each run by writing results.json with ``objective(parameters)`` as val_acc."""

    def launch(batch: list[list[str]], first: int):
        for num in range(first, first + len(batch)):
            params = {
                k: v["value"] for k, v in json.loads((folder / str(num) / RUN_FILE).read_text())["config"].items()
            }
            (folder / str(num) / "results.json").write_text(json.dumps({"val_acc": objective(params), "tasks": {}}))
        return [SimpleNamespace(status=SimpleNamespace(name="COMPLETED"))] * len(batch)

    return launch


def suggested_lrs(folder: Path) -> list[float]:
    return [r.config["optim.patch_lr"]["value"] for r in read_runs(folder, read_sweep(folder)["sweep"])]


def test_bayes_follows_the_metric_it_is_fed(tmp_path):
    """The same seed, two objectives (best at lr 0.03, or worst there): the engine's first suggestions are
    the same, then it moves towards what the results said."""

    def sweep(name: str, sign: int) -> list[float]:
        seed_engine(0)
        folder = tmp_path / name
        init_sweep(folder, BAYES)
        objective = lambda p: sign * -((math.log10(p["optim.patch_lr"]) + 1.5) ** 2)  # noqa: E731
        assert drive(folder, fake_launch(folder, objective), {"patch"}, count=8) == []
        return suggested_lrs(folder)

    best, worst = sweep("best", 1), sweep("worst", -1)
    assert best[:3] == worst[:3] and best[3:] != worst[3:]
    distance = lambda lrs: np.mean([abs(math.log10(lr) + 1.5) for lr in lrs[4:]])  # noqa: E731
    assert distance(best) < distance(worst)


def test_training_runs_in_the_same_process_do_not_replay_the_engine(tmp_path):
    """A serial launcher trains in the driver's process, and each run reseeds numpy (seed_everything):
    the engine keeps drawing new points all the same."""
    folder = tmp_path / "s"
    init_sweep(folder, BAYES)
    launch = fake_launch(folder, lambda p: 0.5)  # a flat metric: bayes then relies on its random draws

    def reseeding_launch(batch, first):
        np.random.seed(0)  # what train.py's seed_everything(0) does
        return launch(batch, first)

    drive(folder, reseeding_launch, {"patch"}, count=6)
    assert len(set(suggested_lrs(folder))) == 6


def test_grid_runs_each_point_once_and_a_folder_keeps_its_sweep(tmp_path):
    grid = {"program": "train.py", "method": "grid", "parameters": {"patch": {"values": ["logits", "bn", "dw"]}}}
    folder = tmp_path / "grid"
    init_sweep(folder, grid, ["task=digits"])
    launch = fake_launch(folder, lambda p: 0.5)
    assert drive(folder, launch, {"patch"}, count=2) == []  # stops at count
    assert drive(folder, launch, {"patch"}, count=None) == []  # continues to the end of the grid
    runs = read_runs(folder, grid)
    assert sorted(r.config["patch"]["value"] for r in runs) == ["bn", "dw", "logits"]
    assert all(r.state == "finished" and r.summary_metrics == {} for r in runs)  # no metric in this sweep
    with pytest.raises(SweepError, match="holds another sweep"):
        init_sweep(folder, BAYES)
    init_sweep(tmp_path / "b", BAYES)
    with pytest.raises(SweepError, match=r"never runs out of suggestions"):
        drive(tmp_path / "b", launch, set(), count=None)


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    folder = tmp_path / "f"
    init_sweep(folder, BAYES)
    ok = fake_launch(folder, lambda p: 0.5)

    def launch(batch, first):
        returns = ok(batch, first)
        (folder / str(first) / "results.json").unlink()  # the first run of each batch died
        return [SimpleNamespace(status=SimpleNamespace(name="FAILED")), *returns[1:]]

    assert drive(folder, launch, {"patch"}, count=4, batch_size=2) == [0, 2]
    assert [r.state for r in read_runs(folder, BAYES)] == ["failed", "finished", "failed", "finished"]


def test_sweep_options_the_command_line_also_sets_are_refused(tmp_path):
    folder = tmp_path / "x"
    init_sweep(folder, BAYES, ["patch=bn"])
    with pytest.raises(SweepError, match="the sweep sets patch: leave them out"):
        drive(folder, fake_launch(folder, lambda p: 0.5), {"patch"}, count=1)


def test_metric_names_map_to_results_json():
    results = {"val_acc": 0.5, "test_acc": 0.4, "tasks": {"digits": {"val_acc": 0.7, "test_acc": 0.6}}}
    assert metric_value(results, "val/acc") == 0.5 and metric_value(results, "test/digits/acc") == 0.6
    assert metric_value(results, "val/acc_best") == 0.5  # results.json's val_acc is the tested (best) checkpoint's
    with pytest.raises(SweepError, match=r"'val/loss' is not in results.json; use val/acc.*tasks of this run: digits"):
        metric_value(results, "val/loss")


def test_bad_sweep_file_is_refused_with_the_reason(tmp_path):
    with pytest.raises(SweepError, match="not a valid W&B sweep"):
        load_sweep_file(write_sweep(tmp_path, {"method": "bogus", "parameters": {"patch": {"values": [1]}}}))
    with pytest.raises(SweepError, match=r"not found; the sweep files are in sweeps/: embedded_bayes.yaml, lr_per"):
        load_sweep_file(tmp_path / "missing.yaml")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_bayes_sweep_through_train_py(tmp_path, data_dir, wandb_env):
    """hydra/sweeper=wandb with the serial launcher: 4 runs, 2 at a time; each run's config is what the
    engine suggested, its W&B run is in the sweep's group, its metric went back to the engine; running the
    command again with a larger count continues the sweep."""
    path, sweep = write_sweep(tmp_path, BAYES), tmp_path / "sweep"
    args = [*CLI_TINY, "hydra/sweeper=wandb", f"hydra.sweeper.sweep={path}", "hydra.sweeper.batch_size=2"]
    args += [f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}", "threads=1"]
    proc = train_py("-m", *args, "hydra.sweeper.count=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = read_sweep(sweep)
    assert state["group"] == "tiny-bayes-sweep" and state["overrides"][: len(CLI_TINY)] == CLI_TINY
    runs = read_runs(sweep, state["sweep"])
    assert [r.state for r in runs] == ["finished"] * 4
    for num, run in enumerate(runs):
        results = json.loads((sweep / str(num) / "results.json").read_text())
        assert run.summary_metrics == {"val/acc": results["val_acc"]}
        config = yaml.safe_load((sweep / str(num) / "config.yaml").read_text())
        assert config["optim"]["patch_lr"] == run.config["optim.patch_lr"]["value"]
        assert results["patch"] == run.config["patch"]["value"]
        (wandb_run,) = (sweep / str(num) / "wandb").glob("offline-run-*")
        logged = read_offline_run(wandb_run)
        assert logged.exited and logged.group == "tiny-bayes-sweep"
        assert logged.config["optim"]["patch_lr"] == run.config["optim.patch_lr"]["value"]

    proc = train_py("-m", *args, "hydra.sweeper.count=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r.state for r in read_runs(sweep, state["sweep"])] == ["finished"] * 5
    assert len(list(sweep.glob("4/wandb/offline-run-*"))) == 1 and not (sweep / "5").exists()
