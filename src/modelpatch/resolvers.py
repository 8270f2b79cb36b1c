"""Resolvers of the run config that need no job: ``${mp.launch_dir:}``.

Hydra's ``${hydra:runtime.cwd}`` resolves only inside a job: a sweeper reads ``hydra.sweep.dir`` before any
job exists, so a sweep folder under ``paths.root_dir`` must not depend on it.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def launch_dir() -> str:
    """The folder ``train.py`` was started from: Hydra's ``runtime.cwd`` inside a job, else (a sweeper
    choosing its sweep folder, before any job) the working directory, which nothing has changed yet."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.cwd)
    return os.getcwd()


def register() -> None:
    """Register the resolvers above (again: a no-op)."""
    if not OmegaConf.has_resolver("mp.launch_dir"):
        OmegaConf.register_new_resolver("mp.launch_dir", launch_dir)


register()
