"""Sweeps: the W&B sweep files (each run's command line built by W&B's own agent code and composed by
train.py's Hydra parser), the Optuna search through the command line, and a sweep over an option that
does not exist."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from modelpatch.cluster.callbacks import check_group_choices
from modelpatch.models.patches import resolve_patch
from modelpatch.run import check_config
from modelpatch.sweeps.overrides import flatten, program_command
from modelpatch.training.weights import load_backbone

from .support import CLI_TINY, CONF, ROOT, train_py

with warnings.catch_warnings():  # sweeps 0.3 sets a pydantic-1 config key that pydantic 2 warns about
    warnings.simplefilter("ignore", UserWarning)
    import sweeps

SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
AGENT_COMMAND = ["${env}", "${interpreter}", "-m", "modelpatch.sweep", "run", "${program}", "${args_json}"]
GROUP_KEYS = {"patch": "patch.kind", "backbone": "backbone.name", "task": "task.name", "optim": "optim.name"}


def expand(config: dict) -> list[dict[str, dict]]:
    """Every run of a grid sweep (8 draws of any other method) as W&B's engine suggests it."""
    config = sweeps.SweepConfig(config)
    runs = []
    while config["method"] == "grid" or len(runs) < 8:
        (run,) = sweeps.next_runs(config, runs, validate=True, n=1)
        if run is None:
            break
        run.state = sweeps.RunState.finished
        runs.append(run)
    return [json.loads(json.dumps(run.config)) for run in runs]  # as the server sends them: JSON


def agent_command(config: dict, args: dict[str, dict], monkeypatch, tmp_path) -> list[str]:
    """The command line ``wandb agent`` starts for a run with these ``args`` ({name: {"value": v}}, as the
    server sends them): W&B's own ``Agent._command_run``, with the process it would start captured."""
    from wandb import wandb_agent

    started = []

    class Started:  # what the agent would start: only its command line is kept
        def __init__(self, command=None, **_):
            started.append(command)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Started)
    for key in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(key, "")  # restored afterwards; _command_run sets them
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweep0")
    agent._sweep_command = config.get("command") or wandb_agent.Agent.DEFAULT_SWEEP_COMMAND
    agent._command_run({"run_id": f"run{len(started)}", "program": config["program"], "args": args})
    (command,) = started
    return command


def run_argv(command: list[str]) -> list[str]:
    """train.py's command line from an agent's command (``python -m modelpatch.sweep run ...``)."""
    assert command[:5] == ["/usr/bin/env", "python", "-m", "modelpatch.sweep", "run"], command
    program, args_json, *extra = command[5:]
    return program_command(program, json.loads(args_json), extra)


def compose_argv(argv: list[str], tmp_path):
    """``train.py``'s config for these overrides, composed by Hydra as ``train.py`` composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=argv, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation works
    return cfg


def test_the_sweep_files_are_there():
    assert {p.stem for p in SWEEP_FILES} >= {"patch_x_task", "patch_x_backbone", "lr_per_patch"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_wandb_sweep_is_valid_and_each_agent_command_composes(path, tmp_path, monkeypatch):
    """Each run of each sweep file, as ``wandb agent`` would start it, through train.py's Hydra parser."""
    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == []
    assert config["command"] == AGENT_COMMAND and config["program"] == "train.py"
    runs = expand(config)
    if config["method"] == "grid":
        sizes = [len(p["values"]) for p in config["parameters"].values() if "values" in p]
        assert len(runs) == math.prod(sizes) and len({json.dumps(r, sort_keys=True) for r in runs}) == len(runs)

    backbones, pairs = {}, set()
    GlobalHydra.instance().clear()
    monkeypatch.chdir(ROOT)  # the agent runs in the repository root
    for run in runs:
        argv = run_argv(agent_command(config, run, monkeypatch, tmp_path))
        assert argv[:2] == [sys.executable, "train.py"]
        cfg = compose_argv(argv[2:], tmp_path)
        for key, value in run.items():
            if key == "logger":
                assert value["value"] in cfg.logger, argv
            else:
                assert OmegaConf.select(cfg, GROUP_KEYS.get(key, key)) == value["value"], (key, argv)
        check_config(cfg)
        pairs.add((cfg.backbone.name, cfg.patch.kind, cfg.patch.norm_stats))
        backbones.setdefault(cfg.backbone.name, cfg.backbone)
    GlobalHydra.instance().clear()
    # the patch selects something on each backbone it is swept on (random init: no download)
    built = {n: load_backbone(n, weights=None, width=b.width, mean=b.mean, std=b.std) for n, b in backbones.items()}
    for name, kind, norm_stats in sorted(pairs):
        resolve_patch(built[name], kind, norm_stats=norm_stats, model_name=name)


# Values Hydra's parser reads differently from what W&B's own ${args_no_hyphens} writes (None, new keys,
# quotes), or only when written its way (booleans, lists, '+', floats in exponent form, nested parameters).
AWKWARD = {
    "patch": "bn+dw",
    "backbone.weights": None,
    "patch.train_shared": True,
    "channels_last": False,
    "task": "multi",
    "task.tasks": ["fmnist_a", "digits"],
    "optim.patch_lr": 1e-05,
    "optim": {"head_lr": 0.25, "momentum": 0.5},
    "trainer.max_steps": 7,
    "tags": ["it's", "a b", "null", "1"],
    "extras.note": "x=1, y: [2]",
}


def test_awkward_parameters_reach_train_py_as_the_same_values(tmp_path, monkeypatch):
    config = {"program": "train.py", "command": AGENT_COMMAND, "method": "grid"}
    args = {k: {"value": v} for k, v in AWKWARD.items()}
    monkeypatch.chdir(ROOT)
    cfg = compose_argv(run_argv(agent_command(config, args, monkeypatch, tmp_path))[2:], tmp_path)
    got = {key: OmegaConf.select(cfg, GROUP_KEYS.get(key, key)) for key in flatten(AWKWARD)}
    got = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in got.items()}
    assert got == flatten(AWKWARD)
    assert cfg.backbone.weights is None and cfg.patch.train_shared is True and cfg.channels_last is False
    GlobalHydra.instance().clear()


def test_wandb_args_no_hyphens_gets_none_wrong(tmp_path, monkeypatch):
    """Why the sweep files do not use W&B's ${args_no_hyphens}: Hydra reads its None as the string 'None'."""
    config = {"program": "train.py", "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]}
    command = agent_command(config, {"backbone.weights": {"value": None}}, monkeypatch, tmp_path)
    assert command[3:] == ["backbone.weights=None"]
    assert compose_argv(command[3:], tmp_path).backbone.weights == "None"
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_a_sweep_file_runs_as_wandb_agent_starts_it(tmp_path, data_dir, monkeypatch):
    """One run of sweeps/patch_x_task.yaml: the agent's command itself (with `python` on PATH being this
    environment's, as in an activated venv), plus the tiny-run overrides."""
    config = yaml.safe_load((ROOT / "sweeps" / "patch_x_task.yaml").read_text())
    run = {"patch": {"value": "bn+dw"}, "task": {"value": "digits"}, "logger": {"value": "csv"}}
    run |= {"backbone.weights": {"value": None}}  # no download here
    command = agent_command(config, run, monkeypatch, tmp_path)
    out = tmp_path / "run"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    tiny = [*CLI_TINY, f"hydra.run.dir={out}", f"paths.data_dir={data_dir}"]
    proc = subprocess.run([*command, *tiny], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["patch"] == "bn+dw" and results["backbone"]["weights"] == "random"
    assert yaml.safe_load((out / "config.yaml").read_text())["backbone"]["weights"] is None
    assert {"patch=bn+dw", "++backbone.weights=null", "logger=csv"} <= set(results["overrides"])


@pytest.mark.slow
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


@pytest.mark.slow
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
