"""The report over results.json files: seeds averaged, a Pareto front per setting, K tasks in one model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from modelpatch.reporting.multitask import multitask_rows
from modelpatch.reporting.report import aggregate, collect, fronts, main, rows, setting_label


def result(tasks: dict[str, tuple[float, int]], *, patch="bn", backbone="mobilenet_v2", seed=0, total=1000, **kw):
    """A results.json object: ``tasks`` maps a task to (test accuracy, parameters it adds)."""
    return {
        "backbone": {"name": backbone, "width": 1.0, "features": 1280, "weights": kw.get("weights", "imagenet")},
        "patch": patch,
        "norm_stats": kw.get("norm_stats", "task"),
        "train_shared": kw.get("train_shared", False),
        "tasks": {
            t: {"test_acc": acc, "val_acc": acc - 0.01, "params_patch": n - 10, "params_head": 10}
            for t, (acc, n) in tasks.items()
        },
        "params": {"total": total},
        "seed": seed,
        "overrides": [f"patch={patch}", f"seed={seed}", "paths.data_dir=/x", *kw.get("overrides", [])],
    }


def write(root: Path, runs: list[dict]) -> Path:
    for i, r in enumerate(runs):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "results.json").write_text(json.dumps(r))
    return root


def test_seeds_are_averaged_and_other_settings_are_not(tmp_path):
    runs = [result({"a": (acc, 100)}, seed=s) for s, acc in enumerate([0.5, 0.6, 0.7])]
    runs += [result({"a": (0.9, 100)}, overrides=["optim.patch_lr=0.1"])]  # another setting: its own row
    runs += [result({"a": (0.8, 100)}, norm_stats="frozen")]
    table = rows(collect(write(tmp_path, runs)))
    assert [r["seed"] for r in table].count(0) == 3 and {r["norm_stats"] for r in table} == {"task", "frozen"}
    means = {(m["norm_stats"], m["overrides"]): m for m in aggregate(table)}
    assert len(means) == 3
    three = means[("task", "")]
    assert three["n"] == 3 and three["seeds"] == "0,1,2"
    assert three["test_acc"] == pytest.approx(0.6) and three["test_acc_std"] == pytest.approx(0.1)
    assert three["val_acc"] == pytest.approx(0.59)
    one = means[("task", "optim.patch_lr=0.1")]
    assert one["n"] == 1 and one["test_acc"] == 0.9 and one["test_acc_std"] is None


def test_a_pareto_front_per_backbone_and_setting(tmp_path):
    """Pooled, resnet18's bn (more parameters, lower accuracy than mobilenet's full) would be off the front;
    so would the default recipe's bn (0.70) beside another rate's (0.85)."""
    runs = [
        result({"a": (0.70, 100)}, patch="bn"),
        result({"a": (0.90, 5000)}, patch="full"),
        result({"a": (0.80, 300)}, patch="bn", backbone="resnet18"),
        result({"a": (0.75, 200)}, patch="logits", backbone="resnet18"),
        result({"a": (0.95, 400)}, patch="bn", train_shared=True),
        result({"a": (0.60, 50)}, patch="logits", overrides=["optim.lr=0.3"]),  # another recipe: its own front
        result({"a": (0.85, 100)}, patch="bn", overrides=["optim.lr=0.3"]),
    ]
    means = aggregate(rows(collect(write(tmp_path, runs))))
    got = {setting: front for (task, setting), front in fronts(means).items()}
    assert got == {
        "mobilenet_v2@1.0, imagenet, norm_stats=task": [(100, 0.70), (5000, 0.90)],
        "resnet18@1.0, imagenet, norm_stats=task": [(200, 0.75), (300, 0.80)],
        "mobilenet_v2@1.0, imagenet, norm_stats=task, train_shared": [(400, 0.95)],
        "mobilenet_v2@1.0, imagenet, norm_stats=task, optim.lr=0.3": [(50, 0.60), (100, 0.85)],
    }
    assert setting_label({**means[0], "run_tasks": 3, "overrides": ""}).endswith(", 3 tasks")


def test_k_tasks_in_one_model_against_k_models_table_and_plots(tmp_path):
    """One multi-task run (two seeds) and single-task full models of the same two tasks: the numbers in the
    comparison, and the files the report writes."""
    multi = [
        result({"a": (0.80, 110), "b": (0.90, 110)}, seed=0, total=1300, train_shared=True),
        result({"a": (0.84, 110), "b": (0.88, 110)}, seed=1, total=1300, train_shared=True),
    ]
    single = [
        result({t: (acc, 1000)}, patch="full", total=1000, overrides=[f"task.tasks=[{t}]"])
        for t, acc in [("a", 0.86), ("b", 0.94)]
    ]
    root = write(tmp_path / "runs", [*multi, *single])
    entries = multitask_rows(aggregate(rows(collect(root))))
    assert [(e["kind"], e["model"], e["params"]) for e in entries] == [
        ("multi", "1 mobilenet_v2@1.0 + 2 bn patches", 1300),
        ("separate", "2 separate mobilenet_v2@1.0 (full)", 2000),
    ]
    one, separate = entries
    assert one["accs"] == pytest.approx({"a": 0.82, "b": 0.89}) and one["mean_acc"] == pytest.approx(0.855)
    assert one["n"] == 2 and one["stds"]["a"] == pytest.approx(0.0283, abs=1e-4)
    assert separate["mean_acc"] == pytest.approx(0.90) and separate["n"] == 1

    out = tmp_path / "report"
    assert main([str(root), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert (
        "| a, b | 1 mobilenet_v2@1.0 + 2 bn patches | 1,300 | 0.8550 | a 0.8200 ± 0.0283; b 0.8900 ± 0.0141 | 2 |"
        in text
    )
    assert "| a, b | 2 separate mobilenet_v2@1.0 (full) | 2,000 | 0.9000 | a 0.8600; b 0.9400 | 1 |" in text
    assert "| a | bn | mobilenet_v2@1.0 | imagenet | task | true | 2 | 110 | 1,300 | 0.8200 ± 0.0283 |" in text
    with open(out / "report_mean.csv") as f:
        mean_rows = list(csv.DictReader(f))
    assert {r["n"] for r in mean_rows} == {"2", "1"} and len(mean_rows) == 4
    for png in ("report.png", "multitask.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG") and (out / png).stat().st_size > 10_000


def test_no_multitask_picture_without_single_task_runs_of_its_tasks(tmp_path):
    root = write(
        tmp_path / "runs", [result({"a": (0.8, 110), "b": (0.9, 110)}), result({"a": (0.86, 1000)}, patch="full")]
    )
    assert multitask_rows(aggregate(rows(collect(root)))) == []  # b has no single-task run
    assert main([str(root), "--out", str(tmp_path / "r")]) == 0
    assert not (tmp_path / "r" / "multitask.png").exists() and (tmp_path / "r" / "report.png").exists()
