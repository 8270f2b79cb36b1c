"""A GPU pool on one machine: the jobs of a multirun as child processes, at most ``jobs_per_gpu`` per GPU.

``hydra/launcher=pool`` (``conf/hydra/launcher/pool.yaml``; the Hydra plugin is
``hydra_plugins.modelpatch_pool``) hands this module one :class:`PoolJob` per job. :func:`run_pool`
starts as many as the pool has free places, each with its own ``CUDA_VISIBLE_DEVICES`` and a share of
the cores (``OMP_NUM_THREADS``), starts the next queued job as soon as one ends, and returns every
job's outcome: a failed job does not stop the others. Ctrl-C (or SIGTERM) stops every child (its
whole process group, DataLoader workers included) and re-raises. There is no time limit.

A child runs :func:`run_job_file` (``python -m hydra_plugins.modelpatch_pool.job <job file> <result file>``): the
file is written by the launcher for this one job (cloudpickle of the Hydra context, the task function and the
job's config, as submitit does) and read back by the child it starts; nothing else is unpickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelpatch.atomic import atomic_write

log = logging.getLogger(__name__)

CPU = ""  # CUDA_VISIBLE_DEVICES of a job on a place without a GPU: it sees none
STOP_GRACE_S = 10.0


class PoolConfigError(ValueError):
    """``hydra.launcher.gpus`` / ``jobs_per_gpu`` / ``cpu_jobs`` cannot make a pool."""


@dataclass
class PoolJob:
    """One job of the pool: its number and overrides (for messages), the command, where its output goes."""

    num: int
    name: str
    argv: list[str]
    output: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of a job: the GPU id it ran on (``""``: none), exit code, start and end times."""

    job: PoolJob
    device: str
    returncode: int | None = None
    start: float = 0.0
    end: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else ``0..torch.cuda.device_count()-1``."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def pool_places(gpus: str | Sequence[int | str] | None, jobs_per_gpu: int, cpu_jobs: int) -> dict[str, int]:
    """How many jobs may run at once on each device id (``""``: on the CPU, no GPU visible).

    Args:
        gpus: ``"auto"`` (every visible GPU; none: ``cpu_jobs`` places on the CPU), a list of ids passed to
            the jobs as ``CUDA_VISIBLE_DEVICES`` (on a machine without GPUs they are just names of places),
            or an empty list (CPU only).
        jobs_per_gpu: jobs at once per GPU id.
        cpu_jobs: jobs at once without GPUs.
    """
    if not isinstance(jobs_per_gpu, int) or isinstance(jobs_per_gpu, bool) or jobs_per_gpu < 1:
        raise PoolConfigError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu!r}: set a whole number >= 1")
    if not isinstance(cpu_jobs, int) or isinstance(cpu_jobs, bool) or cpu_jobs < 1:
        raise PoolConfigError(f"hydra.launcher.cpu_jobs={cpu_jobs!r}: set a whole number >= 1")
    if gpus is None or gpus == "auto":
        found = visible_gpus()
        if not found:
            log.info(f"pool: no GPU found; {cpu_jobs} job(s) at once on the CPU (hydra.launcher.cpu_jobs)")
        return {g: jobs_per_gpu for g in found} or {CPU: cpu_jobs}
    if isinstance(gpus, str | int):
        raise PoolConfigError(
            f"hydra.launcher.gpus={gpus!r}: set auto, a list of GPU ids (hydra.launcher.gpus=[0,2,3]), "
            "or [] for the CPU only"
        )
    ids = [str(g).strip() for g in gpus]
    if any(not g or "," in g for g in ids) or len(set(ids)) != len(ids):
        raise PoolConfigError(f"hydra.launcher.gpus={list(gpus)!r}: list each GPU id once, e.g. [0,2,3]")
    if not ids:
        return {CPU: cpu_jobs}
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        found = visible_gpus()
        unknown = [g for g in ids if g.isdigit() and found and g not in found]
        if unknown:
            raise PoolConfigError(
                f"hydra.launcher.gpus={list(gpus)!r}: no GPU {', '.join(unknown)} here; this machine has "
                f"{len(found)} (ids {', '.join(found)}): list some of those, or hydra.launcher.gpus=auto"
            )
        if not found:
            log.info(f"pool: no GPU found; the ids {', '.join(ids)} name places (CUDA_VISIBLE_DEVICES of each job)")
    return dict.fromkeys(ids, jobs_per_gpu)


def _device_label(device: str) -> str:
    return f"GPU {device}" if device != CPU else "CPU"


class _Stop(KeyboardInterrupt):
    """SIGTERM to the launcher: stop the jobs as for Ctrl-C."""


def _raise_stop(signum, frame):
    raise _Stop(f"signal {signum}")


def _stop(running: dict[subprocess.Popen, Outcome]) -> None:
    """SIGTERM each child's process group, then SIGKILL what is left after ``STOP_GRACE_S``."""
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group: DataLoader workers outlive a killed parent
        proc.wait()


def run_pool(jobs: Sequence[PoolJob], places: dict[str, int], threads: int, poll_s: float = 0.2) -> list[Outcome]:
    """Run ``jobs`` (in order) with at most ``places[id]`` at once on each device id; return their outcomes.

    Each child gets ``CUDA_VISIBLE_DEVICES=<id>`` (``""`` on the CPU), ``OMP_NUM_THREADS=threads`` and its
    own process group; its stdout and stderr go to ``job.output``.
    """
    free = dict(places)
    queue = list(jobs)
    running: dict[subprocess.Popen, Outcome] = {}
    outcomes: list[Outcome] = []
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        while queue or running:
            while queue and max(free.values()) > 0:
                device = max(free, key=lambda d: free[d])  # the least busy id: spread before doubling up
                job = queue.pop(0)
                free[device] -= 1
                env = {**os.environ, **job.env, "CUDA_VISIBLE_DEVICES": device, "OMP_NUM_THREADS": str(threads)}
                job.output.parent.mkdir(parents=True, exist_ok=True)
                with open(job.output, "ab") as out:
                    proc = subprocess.Popen(
                        job.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                running[proc] = Outcome(job, device, start=time.time())
                log.info(f"pool: #{job.num} ({job.name}) started on {_device_label(device)}, {threads} thread(s)")
            time.sleep(poll_s)
            for proc in [p for p in running if p.poll() is not None]:
                outcome = running.pop(proc)
                outcome.returncode, outcome.end = proc.returncode, time.time()
                free[outcome.device] += 1
                outcomes.append(outcome)
                state = (
                    "done" if outcome.ok else f"FAILED (exit code {outcome.returncode}, output: {outcome.job.output})"
                )
                log.info(f"pool: #{outcome.job.num} ({outcome.job.name}) {state} in {outcome.end - outcome.start:.1f}s")
    except KeyboardInterrupt:
        log.error(
            f"pool: interrupted; stopping {len(running)} running job(s) "
            f"({', '.join(f'#{o.job.num}' for o in running.values()) or 'none'}); "
            f"{len(queue)} queued job(s) not started"
        )
        _stop(running)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return sorted(outcomes, key=lambda o: o.job.num)


def summary(outcomes: Sequence[Outcome]) -> str:
    """One line for the pool, then one per failed job naming its overrides and output."""
    failed = [o for o in outcomes if not o.ok]
    lines = [f"pool: {len(outcomes)} job(s), {len(outcomes) - len(failed)} done, {len(failed)} failed"]
    lines += [
        f"  FAILED #{o.job.num} ({o.job.name}) on {_device_label(o.device)}: exit code {o.returncode}; "
        f"output: {o.job.output}"
        for o in failed
    ]
    return "\n".join(lines)


def run_job_file(job_file: str, result_file: str) -> int:
    """Run one Hydra job from the file the launcher wrote; write its ``JobReturn``; exit 0 if it completed."""
    payload = pickle.loads(Path(job_file).read_bytes())  # written by this job's launcher, for this process
    for entry in reversed(payload["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals

    hydra_context, task_function, config, singletons = cloudpickle.loads(payload["job"])
    Singleton.set_state(singletons)
    setup_globals()
    ret = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    if ret.status != JobStatus.COMPLETED:
        traceback.print_exception(ret._return_value)  # into this job's output file
    try:
        data = cloudpickle.dumps(ret)
    except Exception:  # an exception or return value that does not pickle: keep its text
        ret._return_value = RuntimeError(repr(ret._return_value))
        data = cloudpickle.dumps(ret)
    atomic_write(result_file, lambda tmp: tmp.write_bytes(data))
    return 0 if ret.status == JobStatus.COMPLETED else 1
