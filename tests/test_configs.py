"""Every option of every config group composes through the real Hydra config."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from modelpatch.data import task_specs
from modelpatch.models.patches import resolve_patch
from modelpatch.training.weights import load_backbone

from .support import CONF

GROUPS = ["backbone", "patch", "task", "data", "optim", "trainer", "callbacks", "logger", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize(("group", "option"), ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_every_option_composes(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}")
    with open_dict(cfg):
        del cfg["hydra"]  # resolved by Hydra itself at run time
    OmegaConf.resolve(cfg)  # every interpolation resolves
    specs = task_specs(OmegaConf.to_container(cfg.task), OmegaConf.to_container(cfg.data))
    assert specs and all(s.input_size > 0 for s in specs)
    if group == "backbone":
        width = 0.25 if option == "mobilenet_v2" else 1.0
        backbone = load_backbone(cfg.backbone.name, width=width)
        assert resolve_patch(backbone, cfg.patch.kind).params
    if group == "patch":
        assert cfg.patch.kind == option


def test_groups_cover_the_product_card():
    for group in ("backbone", "patch", "task", "trainer", "logger", "hydra", "experiment"):
        assert (CONF / group).is_dir(), group
    assert {"logits", "bn", "dw", "bias", "full", "bn+dw"} <= set(options("patch"))
    assert {"fmnist", "fmnist_a", "fmnist_b", "digits", "cifar10", "cifar100"} <= set(options("task"))


def test_unknown_option_lists_the_available_ones(make_cfg):
    with pytest.raises(ConfigCompositionException, match=r"(?s)patch/bnn.*Available options.*bn\+dw"):
        make_cfg("patch=bnn")


def test_experiment_files_state_their_command():
    for path in Path(CONF / "experiment").glob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# @package _global_"), path
        assert "python train.py" in text, path


@pytest.mark.parametrize("kind", options("patch"))
def test_each_patch_kind_brings_its_sgd_rates_and_what_the_user_sets_wins(make_cfg, kind):
    patch = OmegaConf.load(CONF / "patch" / f"{kind}.yaml")
    cfg = make_cfg(f"patch={kind}")
    assert (cfg.optim.name, cfg.optim.patch_lr, cfg.optim.head_lr) == ("sgd", patch.lr, patch.head_lr)
    assert patch.lr > 0 and patch.head_lr > 0
    cfg = make_cfg(f"patch={kind}", "optim.patch_lr=0.02", "optim.head_lr=0.01")
    assert (cfg.optim.patch_lr, cfg.optim.head_lr) == (0.02, 0.01)
    for optim in ("adam", "rmsprop"):  # the kinds' rates are SGD's: another optimizer takes its own lr
        cfg = make_cfg(f"patch={kind}", f"optim={optim}")
        assert (cfg.optim.patch_lr, cfg.optim.head_lr) == (None, None)


def test_from_scratch_and_multi_task_experiments_keep_one_rate(make_cfg):
    for experiment in ("pretrain_fmnist_a", "pretrain_fmnist_64", "multitask_embedded"):
        cfg = make_cfg(f"experiment={experiment}")
        assert (cfg.optim.patch_lr, cfg.optim.head_lr) == (None, None), experiment
    cfg = make_cfg("experiment=transfer_fmnist_b", "patch=bn")  # the transfer study takes the kind's rates
    assert cfg.optim.patch_lr == OmegaConf.load(CONF / "patch" / "bn.yaml").lr
