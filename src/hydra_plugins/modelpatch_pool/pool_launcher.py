"""Hydra launcher ``modelpatch_pool``: each job of a multirun in its own process, at most ``jobs_per_gpu``
per GPU at once (``modelpatch.cluster.pool``). Hydra finds it here, in the ``hydra_plugins`` namespace.

No ``from __future__ import annotations``: Hydra loads this module without registering it in
``sys.modules``, where dataclasses would look the string annotations up."""

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from modelpatch.atomic import atomic_write

log = logging.getLogger(__name__)


@dataclass
class PoolLauncherConf:
    _target_: str = "hydra_plugins.modelpatch_pool.pool_launcher.PoolLauncher"
    # "auto": every GPU this process sees (CUDA_VISIBLE_DEVICES, else all); or a list of ids: [0,2,3]
    gpus: Any = "auto"
    jobs_per_gpu: int = 1
    # jobs at once where there is no GPU (gpus=auto on a machine without one, or gpus=[])
    cpu_jobs: int = 1
    # torch threads of each job; null: the cores shared among the jobs that run at once
    threads_per_job: Any = None
    # the child processes' stdout/stderr and job files
    pool_folder: str = "${hydra.sweep.dir}/.pool"
    env: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/launcher", name="modelpatch_pool", node=PoolLauncherConf, provider="modelpatch"
)


class PoolLauncher(Launcher):
    """Run a multirun's jobs on this machine's GPUs, ``jobs_per_gpu`` at a time on each, the rest queued."""

    def __init__(self, **params: Any) -> None:
        self.params = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in params.items()
        }
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import cloudpickle
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.singleton import Singleton

        from modelpatch.cluster import pool
        from modelpatch.cluster.jobs import threads_per_job

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        try:
            places = pool.pool_places(self.params["gpus"], self.params["jobs_per_gpu"], self.params["cpu_jobs"])
        except pool.PoolConfigError as err:  # the message alone (status 1), before any job starts
            raise SystemExit(f"hydra/launcher=pool: {err}") from err
        threads = threads_per_job(self.params.get("threads_per_job"), min(sum(places.values()), len(job_overrides)))
        folder = Path(str(self.params["pool_folder"]))
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(
            f"pool: {len(job_overrides)} job(s) on "
            + ", ".join(f"{'GPU ' + d if d else 'CPU'} x{n}" for d, n in places.items())
            + f"; sweep dir {self.config.hydra.sweep.dir}"
        )
        jobs, configs = [], {}
        common = set.intersection(*(set(o) for o in job_overrides)) if len(job_overrides) > 1 else set()
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            HydraConfig.instance().set_config(sweep_config)
            work_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
            job_folder = folder / str(idx)
            job_folder.mkdir(parents=True, exist_ok=True)
            data = cloudpickle.dumps((self.hydra_context, self.task_function, sweep_config, Singleton.get_state()))
            job = cloudpickle.dumps({"sys_path": list(sys.path), "job": data})
            atomic_write(job_folder / "job.pkl", lambda tmp, job=job: tmp.write_bytes(job))
            (job_folder / "result.pkl").unlink(missing_ok=True)
            argv = [
                sys.executable,
                "-m",
                "hydra_plugins.modelpatch_pool.job",
                str(job_folder / "job.pkl"),
                str(job_folder / "result.pkl"),
            ]
            name = " ".join(o for o in filter_overrides(overrides) if o not in common)  # what tells jobs apart
            env = {"PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in (self.params.get("env") or {}).items()}}
            jobs.append(pool.PoolJob(idx, name, argv, job_folder / "output.log", env))
            configs[idx] = (list(overrides), sweep_config, work_dir)
        outcomes = pool.run_pool(jobs, places, threads)
        print(pool.summary(outcomes), file=sys.stderr if any(not o.ok for o in outcomes) else sys.stdout, flush=True)
        return [self._job_return(o, *configs[o.job.num]) for o in outcomes]

    @staticmethod
    def _job_return(outcome, overrides: list[str], sweep_config: DictConfig, work_dir: Path) -> JobReturn:
        """The child's own ``JobReturn``; for a child that died without one, a failed one saying so."""
        import pickle

        result = outcome.job.output.parent / "result.pkl"
        if result.exists():
            ret = pickle.loads(result.read_bytes())  # written by the child this launcher started
            for done in (result, outcome.job.output.parent / "job.pkl"):
                done.unlink(missing_ok=True)
            return ret
        error = RuntimeError(
            f"pool job #{outcome.job.num} ({outcome.job.name}) ended with exit code {outcome.returncode} before "
            f"finishing; its output: {outcome.job.output}"
        )
        return JobReturn(
            overrides=overrides,
            cfg=sweep_config,
            hydra_cfg=None,
            working_dir=str(work_dir),
            task_name=str(sweep_config.hydra.job.name),
            status=JobStatus.FAILED,
            _return_value=error,
        )
