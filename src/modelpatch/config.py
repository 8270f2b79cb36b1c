"""The run config: where ``conf/`` is (a checkout's, or the copy shipped in the package), composing it as
``train.py`` would, for runs in this process (tests, benchmarks, notebooks), and reading Hydra overrides."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

import modelpatch.resolvers  # noqa: F401  (conf/ uses the ${mp.*:} resolvers)

SHIPPED_CONF = Path(__file__).resolve().parent / "conf"  # an installed wheel: conf/ as package data
SOURCE_CONF = Path(__file__).resolve().parents[2] / "conf"  # a checkout (editable install)


class ConfigError(ValueError):
    """The composed config asks for something that cannot be built."""


def find_config_dir() -> Path:
    """``conf/`` of this installation: shipped in the package, else the checkout's."""
    for folder in (SHIPPED_CONF, SOURCE_CONF):
        if (folder / "train.yaml").is_file():
            return folder
    raise ConfigError(
        f"no conf/train.yaml in {SHIPPED_CONF} (an installed package) or {SOURCE_CONF} (a checkout); "
        "reinstall modelpatch (pip install .) or pass config_dir="
    )


def compose_run_config(
    overrides: list[str], output_dir: str | Path, data_dir: str | Path | None = None, *, config_dir: Path | None = None
) -> DictConfig:
    """Compose ``conf/train.yaml`` as ``train.py`` would, for a run in this process: outputs go to
    ``output_dir``, and Hydra's runtime config is set, as in a job.

    Args:
        config_dir: the ``conf/`` folder; default ``find_config_dir()``.
        data_dir: ``paths.data_dir``; default as configured (``$MODELPATCH_DATA``, else ``<root>/data``,
            where the root is the checkout, or the working directory for an installed package).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    config_dir = Path(config_dir) if config_dir is not None else find_config_dir()
    root = Path.cwd() if config_dir == SHIPPED_CONF else config_dir.parent
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = cfg.hydra.runtime.output_dir = str(output_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
        cfg.paths.root_dir = cfg.hydra.runtime.cwd = str(root)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def override_key(override: str) -> str:
    """The key a Hydra override sets: ``+trainer.devices=2`` -> ``trainer.devices``, ``~logger`` -> ``logger``."""
    return override.split("=", 1)[0].lstrip("+~")
