"""``hydra/sweeper=wandb``: a W&B sweep file's runs, suggested by W&B's open-source engine (grid, random,
bayes) and launched by whichever Hydra launcher the multirun uses; the state is the sweep folder
(:mod:`modelpatch.sweeps.folder`), so a sweep can be continued by running the same command again."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("modelpatch")


class WandbSweeper(Sweeper):
    def __init__(self, sweep: str, count: int | None = None, batch_size: int = 1, group: str | None = None) -> None:
        self.sweep_file, self.count, self.batch_size, self.group = sweep, count, batch_size, group

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[int]:
        from modelpatch.sweeps.folder import drive, init_sweep, load_sweep_file
        from modelpatch.sweeps.overrides import SweepError, all_groups, hydra_value

        subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)["subdir"]
        if subdir != "${hydra.job.num}":
            raise SweepError(f"hydra.sweep.subdir={subdir}: the W&B sweeper needs each run in <sweep dir>/<num>")
        if self.batch_size < 1:
            raise SweepError(f"hydra.sweeper.batch_size={self.batch_size}: launch at least one run at a time")
        folder = Path(self.config.hydra.sweep.dir).resolve()
        init_sweep(folder, load_sweep_file(Path(self.config.hydra.runtime.cwd, self.sweep_file)), arguments, self.group)
        OmegaConf.save(self.config, folder / "multirun.yaml")

        # Each run in <folder>/<num>, where the engine reads its results.json: the default sweep dir
        # (runs/${task.name}/multiruns/<date>) would move a run whose parameters set the task elsewhere.
        pin = f"hydra.sweep.dir={hydra_value(str(folder))}"

        def launch(batch: list[list[str]], first: int):
            batch = [[*overrides, pin] for overrides in batch]
            self.validate_batch_is_legal(batch)
            return self.launcher.launch(batch, initial_job_idx=first)

        failed = drive(
            folder, launch, all_groups(self.hydra_context.config_loader), count=self.count, batch_size=self.batch_size
        )
        if failed:
            raise SweepError(f"sweep runs {failed} failed: their logs are in {folder}/<num>/")
        return failed
