"""Data-parallel training (DDP) as the task mixing needs it: the strategy's settings and the checks made
before training. What N ranks change in an epoch: ``data.steps.describe_steps``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from modelpatch.config import ConfigError
from modelpatch.data.mixing import Mixing

# Lightning's names for DDP, and the start method each stands for
DDP_NAMES = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}
DDP_TARGETS = ("lightning.pytorch.strategies.DDPStrategy", "lightning.pytorch.strategies.ddp.DDPStrategy")


def check_distributed(cfg: DictConfig) -> None:
    """Settings that cannot work together, refused before any data is read."""
    if not cfg.trainer.get("sync_batchnorm", False):
        return
    if cfg.patch.norm_stats == "frozen":
        raise ConfigError(
            "trainer.sync_batchnorm=true computes BatchNorm statistics over all ranks' batches, but "
            "patch.norm_stats=frozen never computes them (BatchNorm in eval mode): set "
            "trainer.sync_batchnorm=false, or patch.norm_stats=task to re-estimate them"
        )
    if cfg.task.get("mixing") == "per_device":
        raise ConfigError(
            "trainer.sync_batchnorm=true would pool the BatchNorm statistics of different tasks "
            "(task.mixing=per_device trains another task on each rank): set trainer.sync_batchnorm=false"
        )


def ddp_strategy(trainer_cfg: DictConfig, mixing: Mixing, tasks: Sequence[str]) -> DDPStrategy | None:
    """The DDP strategy the mixing needs, or ``None`` where the run is not data-parallel (or uses a
    strategy other than DDP, left as it is).

    Buffers are never broadcast from rank 0 (``broadcast_buffers=False``): each task's statistics are
    averaged over the ranks that trained it instead (``PatchModule.sync_task_statistics``, before
    validation, test and every checkpoint). ``find_unused_parameters`` is on where a step leaves some
    task's patch and head unused (one task per step: ``round_robin``, ``proportional``, ``per_device``).
    A DDP strategy given with settings that contradict these is an error naming the override to drop.
    """
    strategy = trainer_cfg.get("strategy", "auto")
    unused = mixing.leaves_parameters_unused and len(tasks) > 1
    wanted = {"find_unused_parameters": unused, "broadcast_buffers": False}
    if isinstance(strategy, str):
        if strategy == "auto" and _several_devices(trainer_cfg):
            strategy = "ddp"
        name, _, told = strategy.partition("_find_unused_parameters_")
        if name not in DDP_NAMES:
            return None
        if told == "false" and unused:
            raise ConfigError(
                f"trainer.strategy={strategy} breaks task.mixing={mixing.name} (steps that train one task "
                f"leave the others' parameters unused): use trainer.strategy={name}"
            )
        wanted["find_unused_parameters"] = unused or told == "true"
        return DDPStrategy(start_method=DDP_NAMES[name], **wanted)
    given = OmegaConf.to_container(strategy, resolve=True) if isinstance(strategy, DictConfig) else dict(strategy)
    if given.get("_target_") not in DDP_TARGETS:
        return None
    for key, value in wanted.items():
        if key in given and given[key] != value and (key == "broadcast_buffers" or value):
            raise ConfigError(
                f"trainer.strategy.{key}={given[key]} breaks task.mixing={mixing.name} "
                f"({'per-task statistics' if key == 'broadcast_buffers' else 'steps that train one task'}): "
                f"drop the override (it is set from the mixing) or set trainer.strategy.{key}={value}"
            )
    kwargs = {k: v for k, v in given.items() if k != "_target_"}
    return DDPStrategy(**{**kwargs, **{k: v for k, v in wanted.items() if k not in kwargs}})


def _several_devices(trainer_cfg: DictConfig) -> bool:
    if int(trainer_cfg.get("num_nodes", 1) or 1) > 1:
        return True
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices >= 0:
        return devices > 1
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices) > 1
    # "auto" or -1: every device of the accelerator
    return trainer_cfg.get("accelerator", "auto") not in ("cpu",) and torch.cuda.device_count() > 1
