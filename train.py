"""Train a model patch: python train.py backbone=<name> patch=<kind[+kind]> task=<name|multi> [-m]."""

from modelpatch import gc_paused

with gc_paused():
    import hydra
    from omegaconf import DictConfig

    from modelpatch.run import extras, get_metric_value, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    extras(cfg)
    metrics, _ = train(cfg)
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
