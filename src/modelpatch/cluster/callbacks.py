"""Hydra callbacks (``hydra.callbacks`` in ``conf/hydra/default.yaml``): checks and settings a multirun makes before
the sweeper creates any job or folder.

- :class:`CheckSweepChoices`: refuses a sweep over a config group option that does not exist (Hydra's basic
  sweeper checks after creating the sweep folder, Optuna's sweeper only when a trial draws the option).
- :class:`CheckSlurmShape`: stops a SLURM multirun whose job shape and trainer disagree: ``hydra.launcher.nodes`` /
  ``tasks_per_node`` set by hand to other values than ``trainer.num_nodes`` / ``trainer.devices`` (Lightning's SLURM
  environment needs them equal), or one of those swept (one array job has one shape).
- :class:`ShareCoresAmongLocalJobs`: tells the jobs of a ``hydra/launcher=local`` multirun how many run at once.

A check fails with a ``SystemExit`` (status 1, the message on stderr) because Hydra turns any ``Exception`` a
callback raises into a warning.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from modelpatch.cluster.jobs import CONCURRENT_JOBS_ENV, count_sweep_jobs
from modelpatch.cluster.slurm import device_count, slurm_nodes


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
    """A multirun sweeps over a config group option that does not exist."""


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


SHAPE = {"nodes": "trainer.num_nodes", "tasks_per_node": "trainer.devices"}


def slurm_shape_problems(config: DictConfig) -> list[str]:
    """What is wrong with a SLURM multirun's shape (empty: nothing); see :class:`CheckSlurmShape`."""
    launcher, trainer = config.hydra.launcher, config.trainer
    task_overrides = OmegaConf.to_container(config.hydra.overrides, resolve=False)["task"]
    problems = [
        f"{o.input_line}: one SLURM array job has one shape (nodes, tasks per node); run one multirun per value"
        for o in OverridesParser.create().parse_overrides(overrides=task_overrides)
        if o.key_or_group in SHAPE.values() and o.is_sweep_override()
    ]
    try:
        wanted = {
            "nodes": slurm_nodes(trainer.get("num_nodes", 1), trainer.get("strategy")),
            "tasks_per_node": device_count(trainer.devices),
        }
        asked = {key: launcher.get(key) for key in SHAPE}
    except Exception as err:  # a resolver's error (wrapped by OmegaConf) names the bad value
        return [*problems, str(getattr(err, "__cause__", None) or err)]
    for key, source in SHAPE.items():
        if asked[key] != wanted[key]:
            problems.append(
                f"hydra.launcher.{key}={asked[key]} but {source} asks for {wanted[key]}: Lightning needs one task per "
                f"device on each of trainer.num_nodes nodes; drop hydra.launcher.{key} (it follows {source}) or set "
                f"{source}={asked[key]}"
            )
    return problems


class SlurmShapeError(SystemExit):
    """A SLURM multirun whose job shape does not fit the trainer."""


class CheckSlurmShape(Callback):
    """``hydra.callbacks``: before a ``hydra/launcher=slurm`` multirun submits anything, check that each job asks
    for ``trainer.num_nodes`` nodes with ``trainer.devices`` tasks on each (:func:`slurm_shape_problems`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not str(config.hydra.launcher.get("_target_", "")).endswith("SlurmLauncher"):
            return
        problems = slurm_shape_problems(config)
        if problems:
            raise SlurmShapeError("Error: the SLURM job does not fit the trainer: " + "; ".join(problems))


class ShareCoresAmongLocalJobs(Callback):
    """Tell the jobs of a ``hydra/launcher=local`` multirun how many of them run at
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
            key = OverridesParser.create().parse_override(override).get_key_element().lstrip("+~")
            swept[key] = override  # the command line wins, as in Hydra
        jobs = count_sweep_jobs(list(swept.values()), sweeper.get("max_batch_size"))
        os.environ[CONCURRENT_JOBS_ENV] = str(jobs)  # submitit's jobs inherit it
