"""Sweeps without a W&B server: W&B's open-source engine (the ``sweeps`` package: grid, random, bayes)
suggests the runs of a sweep file, kept in a sweep folder.

A sweep folder holds ``sweep.json`` (the sweep file, the overrides every run gets, the W&B group) and a folder
per run, ``<num>/`` (its train.py output dir), with ``sweep_run.json`` (parameters, state, who ran it); each
run's metric goes back to the engine from its ``results.json``. Runs are claimed under a file lock, so several
processes can share a folder: the Hydra sweeper ``hydra/sweeper=wandb`` (runs launched by any Hydra launcher)
and :func:`agent` (runs one by one, e.g. in each task of a SLURM array, :mod:`modelpatch.sweeps.agents`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from modelpatch.atomic import write_json
from modelpatch.config import override_key
from modelpatch.files.results import RESULTS_FILE
from modelpatch.sweeps.overrides import SweepError, config_groups, flatten, hydra_overrides, hydra_value

log = logging.getLogger("modelpatch")

SWEEP_FILE = "sweep.json"
RUN_FILE = "sweep_run.json"
LOCK_FILE = ".sweep.lock"


def _engine():
    """W&B's sweep engine (``sweeps``), imported when needed (it sets a pydantic-1 key pydantic 2 warns about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import sweeps
    return sweeps


# --- the sweep folder ------------------------------------------------------------------------------------


def load_sweep_file(path: str | Path) -> dict:
    """A W&B sweep file, checked against W&B's schema."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found; the sweep files are in sweeps/: {_listing('sweeps')}")
    config = yaml.safe_load(path.read_text())
    problems = _engine().schema_violations_from_proposed_config(config) if isinstance(config, dict) else ["not a map"]
    if problems:
        raise SweepError(f"{path} is not a valid W&B sweep: {'; '.join(problems)}")
    return config


def _listing(folder: str) -> str:
    return ", ".join(sorted(p.name for p in Path(folder).glob("*.yaml"))) or "none here"


def init_sweep(folder: Path, config: dict, overrides: Sequence[str] = (), group: str | None = None) -> dict:
    """Create the sweep folder, or join it if it holds the same sweep; returns its ``sweep.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "sweep": config,
        "overrides": list(overrides),
        "group": group or f"{config.get('name', 'sweep')}-{folder.name}",
    }
    with locked(folder):
        path = folder / SWEEP_FILE
        if path.exists() and json.loads(path.read_text())["sweep"] != config:
            raise SweepError(f"{folder} holds another sweep ({path}): choose a new folder for this one")
        write_json(path, state)
    return state


def read_sweep(folder: Path) -> dict:
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        raise SweepError(f"{folder} is not a sweep folder (no {SWEEP_FILE}): start it from a sweep file")
    return json.loads(path.read_text())


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the sweep folder (``flock``: on a cluster, its file system must support it)."""
    with open(Path(folder) / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_numbers(folder: Path) -> list[int]:
    return sorted(int(p.parent.name) for p in Path(folder).glob(f"*/{RUN_FILE}") if p.parent.name.isdigit())


def metric_value(results: dict, name: str) -> float | None:
    """A W&B metric name read from ``results.json``: ``val/acc`` -> ``val_acc``, ``test/<task>/acc`` ->
    ``tasks[<task>].test_acc``; ``val/acc_best`` -> ``val_acc`` (results.json holds the validation accuracy
    of the checkpoint it tested, the best one)."""
    if name == "val/acc_best":
        name = "val/acc"
    parts = name.split("/")
    if len(parts) == 2 and parts[1] == "acc":
        return results.get(f"{parts[0]}_acc")
    if len(parts) == 3 and parts[2] == "acc" and parts[1] in results.get("tasks", {}):
        return results["tasks"][parts[1]].get(f"{parts[0]}_acc")
    raise SweepError(
        f"metric {name!r} is not in results.json; use val/acc_best, val/acc, test/acc, val/<task>/acc or "
        "test/<task>/acc "
        f"(tasks of this run: {', '.join(results.get('tasks', {}))})"
    )


def read_runs(folder: Path, sweep: dict) -> list:
    """The sweep's runs as the engine sees them (``sweeps.SweepRun``): a run with a ``results.json`` is
    finished, with its metric as summary."""
    engine = _engine()
    metric = (sweep.get("metric") or {}).get("name")
    runs = []
    for num in run_numbers(folder):
        record = json.loads((folder / str(num) / RUN_FILE).read_text())
        results = folder / str(num) / RESULTS_FILE
        summary, state = {}, record["state"]
        if results.is_file():
            state = "finished"
            value = metric_value(json.loads(results.read_text()), metric) if metric else None
            if value is not None:
                summary[metric] = value
        runs.append(engine.SweepRun(name=str(num), config=record["config"], state=state, summary_metrics=summary))
    return runs


_ENGINE_STATE: dict[str, Any] = {}


def seed_engine(seed: int | None) -> None:
    """Seed the engine's own random numbers (``None``: from the OS)."""
    import numpy as np

    _ENGINE_STATE["state"] = np.random.RandomState(seed).get_state()


@contextmanager
def engine_random() -> Iterator[None]:
    """The engine draws from numpy's global generator, which a training run in this process reseeds
    (``seed_everything``): without its own state, a serial sweep would be offered the same points again."""
    import numpy as np

    if "state" not in _ENGINE_STATE:
        seed_engine(None)
    outer = np.random.get_state()
    np.random.set_state(_ENGINE_STATE["state"])
    try:
        yield
    finally:
        _ENGINE_STATE["state"] = np.random.get_state()
        np.random.set_state(outer)


def _who() -> dict:
    slurm = {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID") if k in os.environ}
    return {"host": socket.gethostname(), "pid": os.getpid(), **slurm}


def claim(folder: Path, n: int, limit: int | None = None) -> list[tuple[int, dict]]:
    """Up to ``n`` new runs from the engine (at most ``limit`` in the whole folder), recorded as running.

    Returns:
        ``(num, {parameter: value})`` per run, numbered on from the folder's last run; empty when the
        sweep is done (a grid is exhausted, or ``limit`` is reached).
    """
    engine = _engine()
    with locked(folder):
        sweep = read_sweep(folder)["sweep"]
        runs = read_runs(folder, sweep)
        n = n if limit is None else min(n, limit - len(runs))
        if n <= 0:
            return []
        with engine_random():
            suggested = [s for s in engine.next_runs(sweep, runs, validate=True, n=n) if s is not None]
        first = max(run_numbers(folder), default=-1) + 1
        claimed = []
        for num, run in enumerate(suggested, start=first):
            config = json.loads(json.dumps(run.config, default=lambda x: x.item()))  # numpy scalars as numbers
            write_json(folder / str(num) / RUN_FILE, {"config": config, "state": "running", "by": _who()})
            claimed.append((num, {k: v["value"] for k, v in config.items()}))
    return claimed


def finish(folder: Path, num: int, ok: bool) -> str:
    """Record how run ``num`` ended: finished if it wrote its ``results.json``, else failed."""
    path = folder / str(num) / RUN_FILE
    with locked(folder):
        record = json.loads(path.read_text())
        record["state"] = "finished" if ok and (folder / str(num) / RESULTS_FILE).is_file() else "failed"
        write_json(path, record)
    return record["state"]


def run_overrides(state: dict, groups: set[str], params: dict) -> list[str]:
    """What one run of the folder gets: the folder's overrides, W&B logging in the sweep's group, and the
    run's parameters."""
    given = {override_key(o) for o in state["overrides"]} | set(flatten(params))
    wandb = [] if "logger" in given else ["logger=wandb"]
    group = [f"++logger.wandb.group={hydra_value(state['group'])}"] if state["group"] else []
    return [*state["overrides"], *wandb, *group, *hydra_overrides(params, groups)]


def check_overlap(params: Sequence[str], overrides: Sequence[str]) -> None:
    keys = {override_key(o) for o in overrides}
    both = sorted(keys & {p.lstrip("+~") for p in params})
    if both:
        raise SweepError(f"the sweep sets {', '.join(both)}: leave them out of the command line")


def drive(
    folder: Path,
    launch: Callable[[list[list[str]], int], Sequence[Any]],
    groups: set[str],
    *,
    count: int | None,
    batch_size: int = 1,
) -> list[int]:
    """Claim runs ``batch_size`` at a time, launch them (``launch(overrides per run, first num)`` returns
    Hydra ``JobReturn``s), record how each ended, until the engine is done or the folder has ``count`` runs.

    Returns:
        The numbers of the runs that failed.
    """
    state = read_sweep(folder)
    sweep = state["sweep"]
    if count is None and sweep["method"] != "grid":
        raise SweepError(f"method {sweep['method']} never runs out of suggestions: set the number of runs (count)")
    check_overlap(list(sweep["parameters"]), state["overrides"])
    metric = (sweep.get("metric") or {}).get("name")
    failed = []
    while claimed := claim(folder, batch_size, count):
        returns = launch([run_overrides(state, groups, params) for _, params in claimed], claimed[0][0])
        for (num, params), ret in zip(claimed, returns, strict=True):
            ended = finish(folder, num, ok=getattr(ret.status, "name", "") == "COMPLETED")
            failed += [num] if ended == "failed" else []
            log.info(f"sweep run {num} {ended}: {params}" + _metric_note(folder / str(num), metric))
    return failed


def _metric_note(run_dir: Path, metric: str | None) -> str:
    results = run_dir / RESULTS_FILE
    if not metric or not results.is_file():
        return ""
    return f"; {metric} = {metric_value(json.loads(results.read_text()), metric)}"


def agent(folder: Path, count: int | None = None) -> list[int]:
    """Train the sweep's runs one after another in this process's allocation (``train.py`` in a
    subprocess, its output dir ``<folder>/<num>``), until the engine is done or ``count`` runs are done.

    Returns:
        The numbers of the runs that failed.
    """
    folder = Path(folder).resolve()
    state = read_sweep(folder)
    program = state["sweep"].get("program", "train.py")
    if not Path(program).is_file():
        raise SweepError(f"program {program!r} not found from {Path.cwd()}: run the agent in the repository root")
    groups = config_groups(Path(program).resolve().parent / "conf")
    check_overlap(list(state["sweep"]["parameters"]), state["overrides"])
    done, failed = 0, []
    while count is None or done < count:
        claimed = claim(folder, 1)
        if not claimed:
            break
        ((num, params),) = claimed
        run_dir = hydra_value(str(folder / str(num)))
        cmd = [sys.executable, program, *run_overrides(state, groups, params), f"hydra.run.dir={run_dir}"]
        log.info(f"sweep run {num}: {' '.join(cmd[2:])}")
        ended = finish(folder, num, ok=subprocess.run(cmd, check=False).returncode == 0)
        failed += [num] if ended == "failed" else []
        done += 1
    return failed


def open_sweep(target: str, folder: str | None, overrides: Sequence[str]) -> Path:
    """A sweep file (starts or joins ``folder``, default ``runs/sweeps/<name>``) or an existing sweep folder."""
    path = Path(target)
    if path.is_dir():
        if overrides:
            raise SweepError(f"{target} is a sweep folder: its runs' overrides were set when it was started")
        read_sweep(path)
        return path
    config = load_sweep_file(path)
    out = Path(folder or f"runs/sweeps/{config.get('name', path.stem)}")
    init_sweep(out, config, overrides)
    return out
