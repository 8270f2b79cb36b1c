"""Evaluate patch files on a base: python eval.py 'patches=[<run>/patches/<task>.safetensors]' [base=<weights>]."""

from modelpatch import gc_paused

with gc_paused():
    import hydra
    from omegaconf import DictConfig

    from modelpatch.run import evaluate, extras


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
