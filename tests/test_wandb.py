"""W&B, offline, through the real command line: what a training run and the report write to their runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modelpatch.reporting.report import COLUMNS

from .support import CLI_TINY, ROOT, train_py
from .wandb_offline import read_offline_run


@pytest.fixture(scope="module")
def wandb_run(wandb_env, tmp_path_factory):
    """One two-epoch training run with ``logger=wandb``: (output dir, its offline W&B run folder)."""
    out = tmp_path_factory.mktemp("wandb") / "run"
    data = tmp_path_factory.mktemp("data")
    proc = train_py(
        *CLI_TINY, "logger=wandb", "patch=bn", "trainer.max_epochs=2", f"hydra.run.dir={out}", f"paths.data_dir={data}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return out, runs[0]


@pytest.mark.slow
def test_training_run_logs_params_and_best_accuracy_to_wandb(wandb_run):
    out, run_dir = wandb_run
    results = json.loads((out / "results.json").read_text())
    run = read_offline_run(run_dir)
    assert run.exited
    assert (run.project, run.group, run.name) == ("modelpatch", "digits-bn", "digits-bn-mobilenet_v2-s0")
    assert run.tags == ["mobilenet_v2", "bn", "digits"]
    # parameter counts, logged at fit start
    for key in ("total", "trainable", "shared", "backbone"):
        assert run.summary[f"params/{key}"] == results["params"][key], key
    assert run.summary["params/digits/patch"] == results["tasks"]["digits"]["params_patch"]
    assert run.summary["params/digits/head"] == results["tasks"]["digits"]["params_head"]
    # per-task and mean validation accuracy every epoch, then once more of the tested (best) checkpoint,
    # which is what the summary holds, as results.json does; val/acc_best: the best so far, summarized by its max
    epochs = [row for row in run.history if "val/acc_best" in row]
    assert len(epochs) == 3
    assert [r["val/acc_best"] for r in epochs[:2]] == pytest.approx(
        [epochs[0]["val/acc"], max(r["val/acc"] for r in epochs[:2])]
    )
    assert run.summary["val/acc_best"] == {"max": pytest.approx(results["val_acc"])}
    assert epochs[2]["val/acc"] == pytest.approx(results["val_acc"])
    assert run.summary["val/acc"] == pytest.approx(results["val_acc"])
    assert run.summary["val/digits/acc"] == pytest.approx(results["tasks"]["digits"]["val_acc"])
    assert run.summary["val/digits/loss"].keys() == {"min"}
    assert run.summary["test/digits/acc"] == pytest.approx(results["tasks"]["digits"]["test_acc"])
    # the model's hyper-parameters, with the resolved run config
    assert run.config["patch"]["kind"] == "bn" and run.config["backbone"]["name"] == "mobilenet_v2"
    assert run.config["meta"]["config"]["task"]["name"] == "digits"


@pytest.mark.slow
def test_report_logs_table_and_plot_to_a_wandb_run(wandb_run, tmp_path):
    out, _ = wandb_run
    report = tmp_path / "report"
    # as users run it; and W&B flushes an offline run's log when its stream closes, which may be after finish()
    # returns, but is before the process that logged it exits
    cmd = [sys.executable, "-m", "modelpatch.report", str(out), "--out", str(report), "--wandb"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (report / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run.exited and run.project == "modelpatch" and run.job_type == "report"
    (logged,) = [row for row in run.history if "report/table/_type" in row]
    assert logged["report/table/_type"] == "table-file" and logged["report/params_vs_accuracy/_type"] == "image-file"
    table = json.loads((run_dir / "files" / logged["report/table/path"]).read_text())
    assert table["columns"] == list(COLUMNS)
    assert [row[:2] for row in table["data"]] == [["digits", "bn"]]
    png = (run_dir / "files" / logged["report/params_vs_accuracy/path"]).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) == (report / "report.png").stat().st_size
    assert run.summary["best/patch"] == "bn"
