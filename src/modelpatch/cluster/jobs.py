"""Where a run's processes run: the cores each job of a multirun gets, how many jobs a sweep starts at once,
and who requeues a SLURM job.

Requeue on preemption or time-out is owned by submitit (``hydra/launcher=slurm``): on its signal it requeues
the same Hydra job, which resumes from its ``checkpoints/last.ckpt``. Lightning's own SLURM auto-requeue is
switched off in such jobs (:func:`cluster_trainer_kwargs`), so exactly one of them acts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

log = logging.getLogger("modelpatch")

# set by cluster.callbacks.ShareCoresAmongLocalJobs for the jobs of a hydra/launcher=local multirun
CONCURRENT_JOBS_ENV = "MODELPATCH_CONCURRENT_JOBS"


def submitit_owns_requeue() -> bool:
    """True in a job that submitit's SLURM executor started (its sbatch script exports ``SUBMITIT_EXECUTOR``)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def cluster_trainer_kwargs() -> dict[str, Any]:
    """Extra ``Trainer`` arguments for this process: in a submitit SLURM job, Lightning's SLURM environment
    without auto-requeue (submitit requeues); elsewhere none (Lightning picks its environment itself)."""
    if not submitit_owns_requeue():
        return {}
    from lightning.fabric.plugins.environments import SLURMEnvironment

    log.info("SLURM job started by submitit: submitit requeues it, Lightning's SLURM auto-requeue is off")
    return {"plugins": [SLURMEnvironment(auto_requeue=False)]}


def count_sweep_jobs(overrides: list[str], max_batch_size: int | None = None) -> int:
    """How many jobs the basic sweeper launches at once for these overrides (``patch=bn,dw seed=0,1``: 4;
    at most ``max_batch_size``, its batch size)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    return len(BasicSweeper.split_arguments(parsed, max_batch_size=max_batch_size)[0])


def available_cores() -> int:
    """The cores this process may use (Linux: its affinity; elsewhere all of them)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def threads_per_job(threads: int | None, jobs: int | None = None, *, cores: int | None = None) -> int | None:
    """Torch intra-op threads of a job: ``threads`` when set; else the cores shared among the ``jobs`` that
    run at once on this machine. ``jobs=None``: this process's own count, a job of a ``hydra/launcher=local``
    multirun (``CONCURRENT_JOBS_ENV``), or else ``None`` (torch's default, one thread per core).
    """
    if threads:
        return int(threads)
    if jobs is None:
        jobs = int(os.environ.get(CONCURRENT_JOBS_ENV, "0"))
        if jobs <= 1 or os.environ.get("SUBMITIT_EXECUTOR") != "local":
            return None
    return max(1, (cores or available_cores()) // max(1, jobs))
