"""The GPU pool launcher (``hydra/launcher=pool``) on a machine without GPUs: the pool is a list of ids,
and each job records the ``CUDA_VISIBLE_DEVICES`` it was given and when it ran."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from modelpatch.cluster.pool import CPU, PoolConfigError, pool_places

from .support import CLI_TINY, CONF, ROOT, popen, train_py

PROBE = ROOT / "tests" / "pool_probe.py"


def probe(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PROBE), "-m", "hydra/launcher=pool", "extras.print_config=false", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records(sweep: Path, name: str = "probe.json") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob(f"*/{name}"))]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_pool_never_shares_a_gpu_runs_every_job_and_reports_the_failed_one(tmp_path):
    sweep = tmp_path / "sweep"
    proc = probe(
        "hydra.launcher.gpus=[3,5]", "seed=0,1,2,3,4,5", "+probe.started=2", "+probe.sleep=0.5", "+probe.fail_seed=2",
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert proc.returncode != 0  # a failed job fails the multirun ...
    summary = proc.stderr
    assert "pool: 6 job(s), 5 done, 1 failed" in summary and "FAILED #2 (seed=2" in summary
    assert "probe job with seed 2 fails on purpose" in (sweep / ".pool" / "2" / "output.log").read_text()
    done = records(sweep)
    assert sorted(r["seed"] for r in done) == [0, 1, 2, 3, 4, 5]  # ... but not the others
    assert {r["cuda_visible_devices"] for r in done} == {"3", "5"}
    for gpu in ("3", "5"):
        on_gpu = sorted((r["start"], r["end"]) for r in done if r["cuda_visible_devices"] == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(on_gpu)), on_gpu
    assert most_at_once([(r["start"], r["end"]) for r in done]) == 2  # both GPUs used, never more
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert {r["omp_num_threads"] for r in done} == {str(share)}


@pytest.mark.slow
def test_pool_runs_jobs_per_gpu_at_once_and_queues_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    proc = probe(
        "hydra.launcher.gpus=[0]", "hydra.launcher.jobs_per_gpu=2", "seed=0,1,2", "+probe.started=2",
        "+probe.sleep=0.5", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pool: 3 job(s), 3 done, 0 failed" in proc.stdout
    done = records(sweep)
    assert len(done) == 3 and {r["cuda_visible_devices"] for r in done} == {"0"}
    assert most_at_once([(r["start"], r["end"]) for r in done]) == 2


@pytest.mark.slow
def test_pool_without_gpus_runs_cpu_jobs_that_see_no_gpu(tmp_path):
    sweep = tmp_path / "sweep"
    proc = probe("hydra.launcher.gpus=[]", "hydra.launcher.cpu_jobs=2", "seed=0,1", "+probe.sleep=0.5",
                 f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["cuda_visible_devices"] for r in records(sweep)] == ["", ""]


@pytest.mark.slow
def test_ctrl_c_stops_every_job_and_starts_no_queued_one(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(PROBE), "-m", "hydra/launcher=pool", "extras.print_config=false"]
    cmd += ["hydra.launcher.gpus=[0,1]", "seed=0,1,2", "+probe.sleep=60", f"hydra.sweep.dir={sweep}"]
    # default SIGINT handling: a suite started in the background (nohup, make test &) inherits it ignored
    driver = popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300  # an upper bound: two probe jobs start in seconds
        while len(records(sweep, "started.json")) < 2:
            assert driver.poll() is None and time.monotonic() < deadline, "the two first jobs did not start"
            time.sleep(0.2)
        pids = [r["pid"] for r in records(sweep, "started.json")]
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        out, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0
    assert "stopping 2 running job(s)" in out and "1 queued job(s) not started" in out
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"job process {pid} still runs"
    assert not (sweep / "2").exists() and records(sweep) == []


@pytest.mark.parametrize(
    ("gpus", "jobs_per_gpu", "match"),
    [
        ("0,1", 1, r"gpus='0,1'.*\[0,2,3\]"),
        ([0, 0], 1, r"each GPU id once"),
        ([0], 0, r"jobs_per_gpu=0"),
    ],
)
def test_pool_refuses_a_bad_pool(gpus, jobs_per_gpu, match):
    with pytest.raises(PoolConfigError, match=match):
        pool_places(gpus, jobs_per_gpu, 1)


def test_pool_auto_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,7")
    assert pool_places("auto", 2, 1) == {"2": 2, "7": 2}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pool_places("auto", 2, 3) == {CPU: 3}


@pytest.mark.slow
def test_train_py_multirun_through_the_pool(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    args = [o for o in CLI_TINY if not o.startswith("trainer.enable_progress_bar")]
    proc = train_py(
        "-m", "hydra/launcher=pool", "hydra.launcher.gpus=[0,1]", *args, "patch=logits,bn",
        f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pool: 2 job(s), 2 done, 0 failed" in proc.stdout
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for num, patch in enumerate(["logits", "bn"]):
        results = json.loads((sweep / str(num) / "results.json").read_text())
        assert results["patch"] == patch and results["tasks"]["digits"]["test_acc"] is not None
        assert f"torch threads: {share}\n" in (sweep / str(num) / "train.log").read_text()
        output = (sweep / ".pool" / str(num) / "output.log").read_text()
        assert "\r" not in output and "epoch 1/1" in output  # no terminal: progress lines, no bar


def test_local_launcher_has_no_hidden_time_limit():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=local"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher.timeout_min >= 365 * 24 * 60  # submitit kills a local job after timeout_min


@pytest.mark.slow
def test_a_pool_without_places_stops_with_its_own_message(tmp_path):
    proc = train_py(
        "-m", "hydra/launcher=pool", "hydra.launcher.gpus=[]", "hydra.launcher.cpu_jobs=0", "patch=bn",
        "extras.print_config=false", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "hydra/launcher=pool: hydra.launcher.cpu_jobs=0: set a whole number >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("runs/*/multiruns/*/0"))
