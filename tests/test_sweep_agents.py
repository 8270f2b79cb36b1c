"""Sweep agents as a SLURM array job, on the local cluster: agents of the server-less engine share one
sweep folder; an array of W&B agents (no W&B server here) is checked as far as its script."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from modelpatch.sweeps.agents import submit
from modelpatch.sweeps.folder import RUN_FILE, read_runs, read_sweep

from .support import BAYES, CLI_TINY, ROOT, write_sweep
from .wandb_offline import read_offline_run


def sweep_cli(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelpatch.sweep", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_agents_in_a_slurm_array_share_one_sweep(slurm, tmp_path, data_dir, wandb_env):
    folder = slurm
    path = write_sweep(tmp_path, BAYES)
    overrides = [*CLI_TINY, f"paths.data_dir={data_dir}", "threads=1"]
    # one run each: docs/clusters.md's command (run by test_docs_commands) has each agent take two in turn
    proc = sweep_cli("agents", "--agents", "2", "--count", "1", "--dir", str(folder), "--wait", str(path), *overrides)
    job = re.search(r"submitted array job (\d+)", proc.stdout)
    try:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    finally:
        if job:
            subprocess.run(["scancel", job[1]], capture_output=True, timeout=30)
    script = (folder / "agents.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and f"modelpatch.sweep agent {folder.resolve()} --count 1" in script
    runs = read_runs(folder, read_sweep(folder)["sweep"])
    assert [r.state for r in runs] == ["finished"] * 2
    by = [(folder / r.name / RUN_FILE).read_text() for r in runs]
    tasks = sorted(re.search(r'"SLURM_ARRAY_TASK_ID": "(\d+)"', b)[1] for b in by)
    assert tasks == ["0", "1"] and all(f'"SLURM_ARRAY_JOB_ID": "{job[1]}"' in b for b in by)
    for task in (0, 1):
        assert f"agent {task} of job {job[1]}" in (folder / f"{job[1]}_{task}.out").read_text()
    for r in runs:
        assert r.summary_metrics["val/acc"] is not None
        (wandb_run,) = (folder / r.name / "wandb").glob("offline-run-*")
        assert read_offline_run(wandb_run).group == read_sweep(folder)["group"]


@pytest.mark.slow
def test_an_array_of_wandb_agents_for_a_sweep_id(tmp_path):
    proc = sweep_cli(
        "agents", "--agents", "3", "--count", "5", "--dir", str(tmp_path), "--partition", "gpu",
        "--gpus-per-task", "1", "--cpus-per-task", "8", "--mem-gb", "32", "--time", "600", "--sbatch=--account=lab",
        "--dry-run", "me/modelpatch/abc123",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = (tmp_path / "agents.sbatch").read_text()
    for line in ("--array=0-2", "--partition=gpu", "--gpus-per-task=1", "--cpus-per-task=8", "--mem=32G", "--time=600"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --account=lab\n" in script and f"cd {ROOT}\n" in script
    assert script.endswith(f"exec {sys.executable} -m wandb agent --count 5 me/modelpatch/abc123\n")
    assert f"export PATH={sys.executable.rsplit('/', 1)[0]}:" in script  # the sweep's `python` is this one


@pytest.mark.slow
def test_a_sweep_id_takes_no_overrides_and_a_bad_target_is_named(tmp_path):
    proc = sweep_cli("agents", "--agents", "1", "--dry-run", "me/modelpatch/abc123", "patch=bn")
    assert proc.returncode == 2 and "take their overrides from the sweep file" in proc.stderr
    proc = sweep_cli("agents", "--agents", "1", "--dry-run", "--dir", str(tmp_path), "no such/file.yaml")
    assert proc.returncode == 2 and "'no such/file.yaml' is neither a sweep folder nor a W&B sweep id" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_server_less_sweep_through_the_slurm_launcher(slurm, tmp_path, data_dir, wandb_env):
    """hydra/sweeper=wandb with hydra/launcher=slurm: each batch of the engine's runs is a SLURM array job."""
    sweep = slurm
    args = [*CLI_TINY, "hydra/sweeper=wandb", f"hydra.sweeper.sweep={write_sweep(tmp_path, BAYES)}"]
    args += ["hydra.sweeper.count=3", "hydra.sweeper.batch_size=2", "hydra/launcher=slurm"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *args, f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = read_runs(sweep, read_sweep(sweep)["sweep"])
    assert [r.state for r in runs] == ["finished"] * 3 and all("val/acc" in r.summary_metrics for r in runs)
    arrays = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
    assert len(arrays) == 2  # a batch of two runs, then one
    for r in runs:
        assert "submitit requeues it" in (sweep / r.name / "train.log").read_text()  # it ran inside SLURM


@pytest.mark.slow
def test_wait_names_the_agent_that_failed_as_soon_as_all_have_ended(slurm, tmp_path):
    """``--wait`` polls the array job itself (sbatch --wait looked at 2, 10 and 42 s) and names each task that
    did not complete."""
    script = tmp_path / "agents.sbatch"
    script.write_text(
        f"#!/bin/bash\n#SBATCH --array=0-2\n#SBATCH --output={tmp_path}/%A_%a.out\n"
        'sleep 1\n[ "$SLURM_ARRAY_TASK_ID" = 1 ] && exit 3\nexit 0\n'
    )
    with pytest.raises(RuntimeError, match=r"job (\d+): an agent ended with an error: \1_1 FAILED \(exit 3:0\)$"):
        submit(script, wait=True)
