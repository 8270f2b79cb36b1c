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
    """``sbatch`` the script; returns the job id (with ``wait``, once every task has ended)."""
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), str(script)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise RuntimeError("sbatch not found: run this on a SLURM login node (or start a local cluster)") from err
    job = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0:
        what = f"job {job}: an agent ended with an error" if wait and job else "sbatch failed"
        raise RuntimeError(f"{what} ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return job
