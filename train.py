"""Train a model patch: python train.py backbone=<name> patch=<kind[+kind]> task=<name|multi> [-m]."""

import gc

# Cyclic garbage collection would run over and over while torch, lightning and their dependencies
# import, and again over all their objects at exit: seconds of a short run (docs/benchmarks.md).
gc.disable()
import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from modelpatch.run import extras, get_metric_value, train  # noqa: E402

gc.enable()
gc.freeze()  # what the imports made stays; never scan it again


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    extras(cfg)
    metrics, _ = train(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
