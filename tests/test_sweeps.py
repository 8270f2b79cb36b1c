"""Sweeps: the W&B sweep files (validated and expanded offline, every run composed through Hydra), the
Optuna search through the command line, and a sweep over an option that does not exist."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from modelpatch.backbones import build_backbone
from modelpatch.launch import check_group_choices
from modelpatch.patches import resolve_patch
from modelpatch.run import check_config

from .conftest import CONF, ROOT
from .test_cli import CLI_TINY, train_py

with warnings.catch_warnings():  # sweeps 0.3 sets a pydantic-1 config key that pydantic 2 warns about
    warnings.simplefilter("ignore", UserWarning)
    import sweeps

SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
HYDRA_COMMAND = ["${env}", "${interpreter}", "train.py", "${args_no_hyphens}"]
GROUP_KEYS = {"patch": "patch.kind", "backbone": "backbone.name", "task": "task.name"}


def expand(config: dict) -> list[dict[str, object]]:
    """Every run of a grid sweep (8 draws of any other method), as {parameter: value}."""
    config = sweeps.SweepConfig(config)
    runs = []
    while config["method"] == "grid" or len(runs) < 8:
        (run,) = sweeps.next_runs(config, runs, validate=True, n=1)
        if run is None:
            break
        run.state = sweeps.RunState.finished
        runs.append(run)
    return [{k: v["value"] for k, v in run.config.items()} for run in runs]


def test_the_sweep_files_are_there():
    assert {p.stem for p in SWEEP_FILES} >= {"patch_x_task", "patch_x_backbone", "lr_per_patch"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_wandb_sweep_is_valid_and_each_run_composes(path, tmp_path):
    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == []
    assert config["command"] == HYDRA_COMMAND and config["program"] == "train.py"
    runs = expand(config)
    if config["method"] == "grid":
        sizes = [len(p["values"]) for p in config["parameters"].values() if "values" in p]
        assert len(runs) == math.prod(sizes) and len({tuple(sorted(r.items())) for r in runs}) == len(runs)

    backbones, pairs = {}, set()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for run in runs:
            overrides = [f"{k}={v}" for k, v in run.items()]  # what ${args_no_hyphens} passes to train.py
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(tmp_path)
                cfg.hydra.runtime.cwd = str(ROOT)
                cfg.hydra.job.num = 0
            HydraConfig().set_config(cfg)
            resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation works
            for key, value in run.items():
                if key == "logger":
                    assert value in resolved["logger"], overrides
                else:
                    assert OmegaConf.select(cfg, GROUP_KEYS.get(key, key)) == value, (key, overrides)
            check_config(cfg)
            pairs.add((cfg.backbone.name, cfg.patch.kind, cfg.patch.norm_stats))
            backbones.setdefault(cfg.backbone.name, cfg.backbone)
    GlobalHydra.instance().clear()
    # the patch selects something on each backbone it is swept on (random init: no download)
    built = {n: build_backbone(n, weights=None, width=b.width, mean=b.mean, std=b.std) for n, b in backbones.items()}
    for name, kind, norm_stats in sorted(pairs):
        resolve_patch(built[name], kind, norm_stats=norm_stats, model_name=name)


def test_optuna_search_runs_its_trials_and_records_the_best(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = train_py(
        *CLI_TINY,
        "hparams_search=optuna_patch",  # multirun by itself (hydra.mode=MULTIRUN)
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={data_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CheckSweepChoices.on_multirun_start raised" not in proc.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    searched = {"optim.patch_lr": (1e-4, 1.0), "optim.head_lr": (1e-4, 1.0), "optim.weight_decay": (1e-6, 1e-2)}
    assert best["name"] == "optuna" and set(best["best_params"]) == set(searched)
    trials = []
    for num in (0, 1):
        results = json.loads((sweep / str(num) / "results.json").read_text())
        job = yaml.safe_load((sweep / str(num) / "config.yaml").read_text())
        for key, (low, high) in searched.items():
            group, name = key.split(".")
            assert low <= job[group][name] <= high and f"{key}={job[group][name]}" in results["overrides"]
        trials.append(results)
    assert best["best_value"] == pytest.approx(max(r["val_acc"] for r in trials))


@pytest.mark.parametrize(
    "sweep",
    [["patch=bn,bogus", "+extras.note=${paths.output_dir}"], ["hparams_search=optuna_patch", "patch=choice(bn,bogus)"]],
    ids=["basic", "optuna"],
)
def test_sweep_over_an_unknown_option_fails_before_any_job(tmp_path, sweep):
    out = tmp_path / "sweep"
    proc = train_py("-m", *CLI_TINY, *sweep, f"hydra.sweep.dir={out}")
    assert proc.returncode != 0
    assert "no 'bogus' in config group 'patch'" in proc.stderr, proc.stderr[-3000:]
    assert "available: bias, bn, bn+bias, bn+dw" in proc.stderr
    assert not out.exists()  # not even the sweep folder


def test_group_choice_check_accepts_what_hydra_can_compose():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        check_group_choices(["patch=bn,bn+dw", "patch=glob(*)", "backbone=resnet18", "optim.lr=0.1,0.2"])
        check_group_choices(["~logger", "+trainer.limit_train_batches=3", "optim=choice(sgd,adam)"])
        check_group_choices(["hydra/launcher=slurm", "hydra.sweep.dir=/tmp/x"])
        for bad in ("backbone=resnet18,resnet19", "optim=choice(sgd,adamw)"):
            with pytest.raises(ConfigCompositionException, match=r"no '(resnet19|adamw)' in config group") as err:
                check_group_choices([bad])
            assert bad in str(err.value)
        available = "available: basic, local, modelpatch_pool, pool, serial, slurm"
        with pytest.raises(ConfigCompositionException, match=rf"no 'slurmm'.*{available}"):
            check_group_choices(["hydra/launcher=slurm,slurmm"])
    GlobalHydra.instance().clear()
