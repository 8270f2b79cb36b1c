"""Launching many runs: SLURM resources from the trainer config, who requeues, sweep checks.

- ``${mp.devices:${trainer.devices}}`` and ``${mp.gpus_per_node:${trainer.accelerator},${trainer.devices}}``:
  the resolvers ``conf/hydra/launcher/slurm.yaml`` uses for ``--ntasks-per-node`` and ``--gpus-per-node``
  (no GPUs with ``trainer.accelerator=cpu``). Registered when this module is imported (``run.py`` does).
- Requeue on preemption or time-out is owned by submitit (``hydra/launcher=slurm``): on its signal it
  requeues the same Hydra job, which resumes from its ``checkpoints/last.ckpt``. Lightning's own SLURM
  auto-requeue is switched off in such jobs (:func:`cluster_trainer_kwargs`), so exactly one of them acts.
- :class:`CheckSweepChoices`: a Hydra callback that refuses a sweep over a config group option that does
  not exist, before the sweeper creates any job or folder (Hydra's basic sweeper checks after creating the
  sweep folder, Optuna's sweeper only when a trial draws the option).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

import modelpatch.ranks  # (registers the mp.rank_zero_only, mp.rank_suffix resolvers)
import modelpatch.slurm  # noqa: F401  (registers the mp.slurm_nodes, mp.slurm_gpus, mp.cpus_per_task, mp.requeues resolvers)

log = logging.getLogger("modelpatch")


def device_count(devices: Any) -> int:
    """``trainer.devices`` as a number of processes per node: an int, a list of ids, or ``"0,1"``."""
    if isinstance(devices, list | tuple | ListConfig):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(
        f"trainer.devices={devices!r} cannot be turned into SLURM tasks per node: set it to a number of devices "
        f"(trainer.devices=2) or a list of ids (trainer.devices=[0,1]) when launching on SLURM"
    )


def gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """GPUs to request per node: none for ``trainer.accelerator=cpu``, else one per device."""
    if str(accelerator) == "cpu":
        return None
    return device_count(devices)


def _register_resolvers() -> None:
    for name, fn in {"mp.devices": device_count, "mp.gpus_per_node": gpus_per_node}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register_resolvers()


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


def _group_values(override: Override) -> list[str]:
    """The option names a group override asks for (every value of a choice sweep)."""
    if override.is_delete():
        return []
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return [str(v) for v in value.list]
    if override.is_sweep_override():  # glob (only matches existing options), range, interval
        return []
    return [str(value)] if value is not None else []


def check_group_choices(overrides: list[str]) -> None:
    """Raise if an override names a config group option that does not exist (e.g. ``patch=bn,bogus``).

    Raises:
        ConfigCompositionException: naming the group, the unknown option(s) and the available ones.
    """
    loader = GlobalHydra.instance().config_loader()
    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    problems = []
    for override in parsed:
        group = override.key_or_group
        if not loader.repository.group_exists(group):
            continue
        options = loader.get_group_options(group)
        unknown = [v for v in _group_values(override) if v not in options]
        if unknown:
            problems.append(
                f"{override.input_line}: no {', '.join(repr(u) for u in unknown)} in config group '{group}'; "
                f"available: {', '.join(options)}"
            )
    if problems:
        raise ConfigCompositionException("unknown config group option in the sweep: " + "; ".join(problems))


class SweepChoiceError(SystemExit):
    """A multirun sweeps over a config group option that does not exist. A ``SystemExit`` (status 1, the
    message on stderr) because Hydra turns any ``Exception`` a callback raises into a warning."""


class CheckSweepChoices(Callback):
    """``hydra.callbacks``: check every group option of a multirun before the sweeper creates any job or folder
    (command-line sweeps such as ``patch=bn,bogus`` and Optuna's ``hydra.sweeper.params``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # unresolved: an override may hold an interpolation (${paths.output_dir}) only a job can resolve
        overrides = OmegaConf.to_container(config.hydra.overrides, resolve=False)
        overrides = [*overrides["task"], *overrides["hydra"]]
        params = OmegaConf.to_container(config.hydra.sweeper, resolve=False).get("params") or {}
        overrides += [f"{key}={value}" for key, value in params.items()]
        try:
            check_group_choices(overrides)
        except ConfigCompositionException as err:
            raise SweepChoiceError(f"Error: {err}") from err


CONCURRENT_JOBS_ENV = "MODELPATCH_CONCURRENT_JOBS"


def count_sweep_jobs(overrides: list[str], max_batch_size: int | None = None) -> int:
    """How many jobs the basic sweeper launches at once for these overrides (``patch=bn,dw seed=0,1``: 4;
    at most ``max_batch_size``, its batch size)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    return len(BasicSweeper.split_arguments(parsed, max_batch_size=max_batch_size)[0])


def threads_per_job(threads: int | None, cores: int | None = None) -> int | None:
    """Torch intra-op threads for this run: ``threads`` when set; else, in a job of a multirun that
    starts all its jobs at once on this machine (``hydra/launcher=local``), the cores shared among
    them; else ``None`` (torch's default, one thread per core)."""
    if threads:
        return int(threads)
    jobs = int(os.environ.get(CONCURRENT_JOBS_ENV, "0"))
    if jobs <= 1 or os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return None
    if cores is None:
        affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all the cores
        cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    return max(1, cores // jobs)


class ShareCoresAmongLocalJobs(Callback):
    """``hydra.callbacks``: tell the jobs of a ``hydra/launcher=local`` multirun how many of them run at
    once, so each uses its share of the cores (``threads_per_job``). Torch's default of one thread per
    core in every job oversubscribes the cores: a step was up to 11x slower (docs/benchmarks.md)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not str(config.hydra.launcher.get("_target_", "")).endswith("LocalLauncher"):
            return
        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
            return
        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
        swept = {key: f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()}
        for override in OmegaConf.to_container(config.hydra.overrides, resolve=False)["task"]:
            swept[override.split("=", 1)[0].lstrip("+~")] = override  # the command line wins, as in Hydra
        jobs = count_sweep_jobs(list(swept.values()), sweeper.get("max_batch_size"))
        os.environ[CONCURRENT_JOBS_ENV] = str(jobs)  # submitit's jobs inherit it
