"""The real command line: train.py single runs and multiruns, and the report over them."""

import json
import os

import pytest

from modelpatch.reporting.report import main as report_main

from .support import CLI_TINY, train_py


@pytest.mark.slow
def test_single_run_writes_results_config_and_logs(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = train_py(*CLI_TINY, "patch=bn+dw", f"hydra.run.dir={out}", f"paths.data_dir={data_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["patch"] == "bn+dw" and "patch=bn+dw" in results["overrides"]
    assert (out / "config.yaml").exists() and (out / "csv" / "metrics.csv").exists()
    assert "params: total" in (out / "train.log").read_text()


@pytest.mark.slow
def test_multirun_over_patches_then_report(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = train_py("-m", *CLI_TINY, "patch=logits,bn", f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    patches = sorted(json.loads((sweep / str(i) / "results.json").read_text())["patch"] for i in (0, 1))
    assert patches == ["bn", "logits"]
    assert report_main([str(sweep)]) == 0
    table = (sweep / "report.md").read_text()
    assert "| digits | logits |" in table and "| digits | bn |" in table
    assert (sweep / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_unknown_patch_on_the_command_line_fails_with_the_options(tmp_path):
    proc = train_py(*CLI_TINY, "patch=bnn", f"hydra.run.dir={tmp_path / 'x'}")
    assert proc.returncode != 0
    assert "Could not find 'patch/bnn'" in proc.stderr and "bn+dw" in proc.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.slow
def test_local_launcher_shares_the_cores_among_its_jobs(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = train_py(
        "-m", "hydra/launcher=local", *CLI_TINY, "patch=logits,bn", f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={data_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for num in (0, 1):
        assert f"torch threads: {share}\n" in (sweep / str(num) / "train.log").read_text()
