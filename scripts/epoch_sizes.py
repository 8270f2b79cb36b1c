"""Print each task's training images and batches per pass, and the steps of one training epoch, for a run's
overrides (the data is read; nothing is trained):

    .venv/bin/python scripts/epoch_sizes.py experiment=multitask_embedded
"""

from __future__ import annotations

import sys
import tempfile

from omegaconf import OmegaConf

from modelpatch.config import compose_run_config
from modelpatch.data import TaskDataModule, make_mixing, task_specs


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_run_config(overrides, out)
    specs = task_specs(OmegaConf.to_container(cfg.task, resolve=True), OmegaConf.to_container(cfg.data, resolve=True))
    mixing = make_mixing(cfg.task.get("mixing", "all"), seed=cfg.seed)
    datamodule = TaskDataModule(specs, root=cfg.data.root, batch_size=cfg.data.batch_size, mixing=mixing)
    datamodule.setup()
    loader = datamodule.train_dataloader()
    iter(loader)
    for spec in specs:  # a pass's batches as the sampler cuts them (a last batch under half a batch left out)
        n, batches = len(datamodule.data[spec.name].train.labels), loader.sampler.batches[spec.name]
        print(f"{spec.name}: {n} training images, {batches} batches of {cfg.data.batch_size}")
    print(f"one epoch (task.mixing={mixing.name}, one process): {len(loader)} steps")


if __name__ == "__main__":
    main(sys.argv[1:])
