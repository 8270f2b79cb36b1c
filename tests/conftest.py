"""Shared fixtures: the real Hydra config shrunk to a tiny run, the real data, one trained source model,
offline W&B, the local SLURM cluster. Plain helpers and constants are in support.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from .support import FASHION_MNIST, START_CLUSTER, compose_cfg

NODE_IDLE_TIMEOUT_S = 300  # a documented SLURM command of the other xdist worker may hold the node meanwhile
SLURM_FIXTURES = {"slurm", "slurm_cluster"}


def pytest_configure(config):
    """Under xdist (make test: 2 workers), each worker's share of the cores: torch threads here and
    OMP_NUM_THREADS for the processes its tests start (those that set their own keep them). Two workers at
    torch's default of one thread per core each ran 2x oversubscribed: CPU time 1.8x, README's 5-patch multirun 7x
    slower (16 s alone, 109 s so)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from modelpatch.cluster.jobs import available_cores

        share = max(1, available_cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Tests on the one-node cluster run one after another, on one xdist worker (make test runs two): two at
    once would queue for the node's CPUs and wait on each other's jobs."""
    for item in items:
        if SLURM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("slurm"))


def pytest_terminal_summary(terminalreporter):
    """Every documented command tests/test_docs_commands.py ran (its time; + where the budget was added) or did
    not run (why), in the docs' order, from the properties each test recorded (a worker's lines do not reach here)."""
    ran, not_run, budgets = [], [], set()
    for outcome in ("passed", "failed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            props = dict(getattr(report, "user_properties", ()))
            if "documented_command" not in props or report.when not in ("setup", "call"):
                continue
            command = props["documented_command"]
            doc, line = command.split(" ", 1)[0].rsplit(":", 1)
            if outcome == "skipped":
                not_run.append(((doc, int(line)), f"not run {command}: {props.get('not_run')}"))
            else:
                budgets.add(props.get("budget"))
                mark = "+" if props.get("budget") else " "
                ran.append(((doc, int(line)), f"{outcome:6} {report.duration:5.1f}s {mark} {command}"))
    if ran or not_run:
        terminalreporter.write_sep("=", f"documented commands: {len(ran)} run, {len(not_run)} not run here")
        for budget in sorted(filter(None, budgets)):
            terminalreporter.write_line(f"  + budget added to train.py: {budget}")
        for _, row in sorted(ran) + sorted(not_run):
            terminalreporter.write_line("  " + row)


BUSY_STATES = {"alloc", "comp"}  # transient: a job is running or its node is cleaning up


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder per session (Fashion-MNIST is extracted into it once)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST files; missing here is a failure, never a skip."""
    missing = [
        f for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz") if not (FASHION_MNIST / f).exists()
    ]
    if missing:
        pytest.fail(f"Fashion-MNIST is not installed at {FASHION_MNIST}: apt-get install dataset-fashion-mnist")
    return FASHION_MNIST


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    """``make_cfg(*overrides, out=subdir)`` -> composed config writing under tmp_path."""

    def make(*overrides: str, out: str = "run") -> DictConfig:
        return compose_cfg(list(overrides), tmp_path / out, data_dir)

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def trained_source(tmp_path_factory, data_dir, fashion_mnist) -> Path:
    """One trained source model for the session (every weight and BatchNorm statistic trained on Fashion-MNIST
    0-4), to patch: a random network's features are near zero under its initial statistics. Its last.ckpt."""
    from modelpatch.run import train

    out = tmp_path_factory.mktemp("source")
    cfg = compose_cfg(
        ["task=fmnist_a", "task.train_size=256", "patch=full", "++trainer.limit_train_batches=16"], out, data_dir
    )
    train(cfg)
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """Offline, with W&B's own settings, cache and staging folders under a temporary folder."""
    home = tmp_path_factory.mktemp("wandb-home")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    env |= {f"WANDB_{k}_DIR": str(home / k.lower()) for k in ("CONFIG", "CACHE", "DATA", "ARTIFACT")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def cancel_jobs(sweep: Path) -> None:
    """Cancel what a test submitted (the array job ids are the folder names under .submitit)."""
    folder = sweep / ".submitit"
    ids = {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.exists() else set()
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=30)


@pytest.fixture
def slurm(tmp_path):
    """An idle node of a running SLURM cluster; yields the sweep folder and cancels its jobs afterwards."""
    if shutil.which("sinfo") is None:
        pytest.fail(f"sinfo not found: SLURM is not installed here; {START_CLUSTER} (it installs slurm-wlm, munge)")
    # The previous test's jobs may still be completing ("comp") or running ("alloc"): wait for them.
    deadline = time.monotonic() + NODE_IDLE_TIMEOUT_S
    while True:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t %P"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            pytest.fail(
                f"sinfo failed: {proc.stderr.strip() or proc.stdout.strip()}; is slurmctld running? {START_CLUSTER}"
            )
        nodes = [line.split() for line in proc.stdout.splitlines() if line.strip()]
        states = {state.rstrip("*~#$@^-") for _, state, *_ in nodes}
        if states & {"idle", "mix"}:
            break
        if not states & BUSY_STATES or time.monotonic() > deadline:
            listed = "; ".join(" ".join(n) for n in nodes) or "no nodes"
            pytest.fail(f"no idle SLURM node after {NODE_IDLE_TIMEOUT_S}s (sinfo: {listed}); {START_CLUSTER}")
        time.sleep(1)
    sweep = tmp_path / "sweep"
    yield sweep
    cancel_jobs(sweep)


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks the md5 of the real Flowers102 .mat files and Places365 file lists; the tiny copies
    the tests write are checked for presence only."""
    import torchvision

    def exists(path, md5=None):
        return os.path.exists(path)

    for module in (torchvision.datasets.flowers102, torchvision.datasets.places365):
        monkeypatch.setattr(module, "check_integrity", exists)
