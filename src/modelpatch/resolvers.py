"""Every ``${mp.*:}`` resolver of ``conf/``, registered once, when this module is imported (``config`` does).

- ``mp.launch_dir`` (``paths.root_dir``): the folder ``train.py`` was started from. Hydra's
  ``${hydra:runtime.cwd}`` resolves only inside a job, and a sweeper reads ``hydra.sweep.dir`` before any job.
- ``mp.rank_zero_only``, ``mp.rank_suffix`` (``conf/hydra/default.yaml``): one writer per job
  (``cluster.ranks``).
- ``mp.devices``, ``mp.gpus_per_node``, ``mp.slurm_nodes``, ``mp.slurm_gpus``, ``mp.cpus_per_task``,
  ``mp.requeues`` (``conf/hydra/launcher/slurm.yaml``): what a SLURM job asks for (``cluster.slurm``).
- ``mp.wandb_run_id`` (``conf/logger/wandb.yaml``): the W&B run id of a run folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from modelpatch.cluster import ranks, slurm


def launch_dir() -> str:
    """The folder ``train.py`` was started from: Hydra's ``runtime.cwd`` inside a job, else (a sweeper
    choosing its sweep folder, before any job) the working directory, which nothing has changed yet."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.cwd)
    return os.getcwd()


def wandb_run_id(output_dir: str, resume: Any = True) -> str | None:
    """The W&B run id of the run in ``output_dir``: the same each time the run starts there (a requeued SLURM
    job, a rerun that resumes from its checkpoint), so that W&B continues it (``resume="allow"``) instead of
    starting another run. Under ``wandb agent``, the agent's id; with ``resume=false``, ``None`` (a new run)."""
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    if str(resume).lower() in ("false", "none"):
        return None
    return hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


RESOLVERS: dict[str, Callable[..., Any]] = {
    "mp.launch_dir": launch_dir,
    "mp.rank_zero_only": ranks.rank_zero_value,
    "mp.rank_suffix": ranks.rank_suffix,
    "mp.devices": slurm.device_count,
    "mp.gpus_per_node": slurm.gpus_per_node,
    "mp.slurm_nodes": slurm.slurm_nodes,
    "mp.slurm_gpus": slurm.slurm_gpus,
    "mp.cpus_per_task": slurm.cpus_per_task,
    "mp.requeues": slurm.requeues,
    "mp.wandb_run_id": wandb_run_id,
}


def register() -> None:
    """Register every resolver of ``RESOLVERS`` (again: a no-op)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
