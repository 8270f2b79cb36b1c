"""Evaluate patch files on a base: python eval.py 'patches=[<run>/patches/<task>.safetensors]' [base=<weights>]."""

import gc

# Cyclic garbage collection would run over and over while torch, lightning and their dependencies
# import, and again over all their objects at exit: seconds of a short run (docs/benchmarks.md).
gc.disable()
import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from modelpatch.run import evaluate, extras  # noqa: E402

gc.enable()
gc.freeze()  # what the imports made stays; never scan it again


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
