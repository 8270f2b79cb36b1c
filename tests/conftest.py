"""Shared fixtures: the real Hydra config, shrunk to a tiny model and a few batches."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from modelpatch.config import compose_run_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# A tiny, fast run: mobilenet_v2 at width 0.25, 32x32 inputs, a few batches on the CPU.
TINY = [
    "backbone.width=0.25",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.num_workers=0",
    "logger=none",
    "extras.print_config=false",
]


def compose_cfg(overrides: list[str], tmp_path: Path, data_dir: Path) -> DictConfig:
    """Compose conf/train.yaml as train.py would, shrunk by TINY, with outputs under ``tmp_path``."""
    return compose_run_config([*TINY, *overrides], tmp_path, data_dir, config_dir=CONF)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder per session (Fashion-MNIST is extracted into it once)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST files; missing here is a failure, never a skip."""
    missing = [
        f for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz") if not (FASHION_MNIST / f).exists()
    ]
    if missing:
        pytest.fail(f"Fashion-MNIST is not installed at {FASHION_MNIST}: apt-get install dataset-fashion-mnist")
    return FASHION_MNIST


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    """``make_cfg(*overrides, out=subdir)`` -> composed config writing under tmp_path."""

    def make(*overrides: str, out: str = "run") -> DictConfig:
        return compose_cfg(list(overrides), tmp_path / out, data_dir)

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
