"""Sweep agents on SLURM: one ``sbatch`` array job, each of its tasks an agent running its runs in its allocation.

An agent of a W&B sweep (a sweep id) is ``wandb agent [--count M] <id>``; an agent of a sweep without a
W&B server (a sweep folder, :mod:`modelpatch.sweeps.folder`) is ``python -m modelpatch.sweep agent <folder>``.
Either way the runs are ``train.py`` processes inside the task's allocation (CPUs, memory, GPUs as asked),
one after another.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class AgentResources:
    """What each agent (array task) asks SLURM for; ``None`` leaves it to the cluster's defaults."""

    partition: str | None = None
    time_min: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    gpus_per_task: int | None = None
    extra: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. --account=x


def agent_command(target: str, count: int | None) -> list[str]:
    """The command of one agent: a sweep folder (server-less engine) or a W&B sweep id."""
    counted = ["--count", str(count)] if count else []
    if Path(target).is_dir():
        return [sys.executable, "-m", "modelpatch.sweep", "agent", str(Path(target).resolve()), *counted]
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+){0,2}", target):
        raise ValueError(
            f"{target!r} is neither a sweep folder nor a W&B sweep id (<id>, <project>/<id> or <entity>/<project>/<id>)"
        )
    return [sys.executable, "-m", "wandb", "agent", *counted, target]


def sbatch_script(command: list[str], agents: int, logs: Path, resources: AgentResources, name: str) -> str:
    """An array job of ``agents`` tasks, each running ``command`` from this folder with this environment's
    ``python`` first on ``PATH`` (a W&B sweep's ``${interpreter}`` is ``python``)."""
    if agents < 1:
        raise ValueError(f"agents={agents}: start at least one agent")
    r = resources
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{agents - 1}"]
    lines += [f"#SBATCH --output={logs}/%A_%a.out"]
    options = {
        "partition": r.partition,
        "time": r.time_min,
        "cpus-per-task": r.cpus_per_task,
        "mem": f"{r.mem_gb}G" if r.mem_gb else None,
        "gpus-per-task": r.gpus_per_task,
    }
    lines += [f"#SBATCH --{k}={v}" for k, v in options.items() if v is not None]
    lines += [f"#SBATCH {x}" for x in r.extra]
    lines += [
        "set -eu",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"',
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        'echo "agent $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on $(hostname)"',
        "exec " + shlex.join(command),
    ]
    return "\n".join(lines) + "\n"


def submit(script: Path, wait: bool = False) -> str:
    """``sbatch`` the script; returns the job id (with ``wait``, once every task has ended: ``wait_for``)."""
    cmd = ["sbatch", "--parsable", str(script)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise RuntimeError("sbatch not found: run this on a SLURM login node (or start a local cluster)") from err
    job = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    if wait:
        wait_for(job)
    return job


# A task in any other state (PENDING, RUNNING, COMPLETING, REQUEUED, ...) has not ended.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def wait_for(job: str, poll_s: float = 1.0) -> None:
    """Return when every task of array job ``job`` has ended; raise naming those that did not complete.

    Polled every ``poll_s`` with ``scontrol`` rather than ``sbatch --wait``, whose checks come 2, 10 and
    42 s after submitting (then every 32 s): two agents done in 12 s returned after 42 s."""
    last: dict[str, tuple[str, str]] = {}
    while True:
        states = job_states(job)
        if not states and last:
            break  # purged from slurmctld (MinJobAge) since the last look: ended
        last = states or last
        if states and all(state in ENDED for state, _ in states.values()):
            break
        time.sleep(poll_s)
    failed = [f"{task} {state} (exit {code})" for task, (state, code) in sorted(last.items()) if state != "COMPLETED"]
    if failed:
        raise RuntimeError(f"job {job}: an agent ended with an error: {', '.join(failed)}")


def job_states(job: str) -> dict[str, tuple[str, str]]:
    """``{<job>_<task>: (JobState, ExitCode)}`` of an array job's tasks, from ``scontrol show job``."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=False)
    out = {}
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobState" in fields:
            task = f"{fields.get('ArrayJobId', job)}_{fields.get('ArrayTaskId', fields.get('JobId', ''))}"
            out[task] = (fields["JobState"], fields.get("ExitCode", "?"))
    return out
