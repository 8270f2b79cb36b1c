"""Run records: where a run's checkpoint keeps what (``CKPT_*``), reading a backbone or tasks out of a
checkpoint, resuming, ``init_from``, and ``results.json`` (``RESULTS_FILE``, ``make_results``), which
run.py writes and report.py reads.

torch and the backbones are imported where they are used: report.py imports this module and stays light.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from modelpatch.config import ConfigError

if TYPE_CHECKING:
    import torch

    from modelpatch.module import PatchModule

RESULTS_FILE = "results.json"

# Where PatchModule keeps the shared backbone and the per-task patches in its state dict.
CKPT_BACKBONE = "model.backbone."
CKPT_PATCHES = "model.patches."


def backbone_state_from_checkpoint(ckpt: Mapping, path: os.PathLike | str) -> dict[str, torch.Tensor]:
    """The backbone a one-task checkpoint of this platform learned: shared weights with the
    task's patch applied (a multi-task checkpoint is ambiguous and refused)."""
    from modelpatch.backbones import BackboneError  # backbones reads checkpoints through this module

    state = ckpt["state_dict"]
    tasks = sorted({k.removeprefix(CKPT_PATCHES).split(".")[0] for k in state if k.startswith(CKPT_PATCHES)})
    if len(tasks) > 1:
        raise BackboneError(
            f"{path} is a multi-task checkpoint (tasks: {', '.join(tasks)}); export one task's "
            "backbone or load it with eval.py instead"
        )
    if not tasks and not any(k.startswith(CKPT_BACKBONE) for k in state):
        raise BackboneError(f"{path} is a Lightning checkpoint, but not one made by modelpatch")
    out = {k.removeprefix(CKPT_BACKBONE): v for k, v in state.items() if k.startswith(CKPT_BACKBONE)}
    for key, value in state.items():
        if key.startswith(CKPT_PATCHES):
            # <prefix><task>.<mangled name>, mangled = backbone name with "." -> "__"
            name = key.removeprefix(CKPT_PATCHES).split(".", 1)[1].replace("__", ".")
            out[name] = value
    return out


class CheckpointMismatchError(ValueError):
    """A checkpoint's tasks, patches or heads do not fit the model being built."""


def load_tasks_from_checkpoint(model: PatchModule, state: Mapping[str, torch.Tensor], path: str) -> list[str]:
    """Load the shared backbone and every task the checkpoint holds into ``model``.

    The model may have tasks the checkpoint lacks (new tasks keep their fresh patch and head);
    anything else that does not match, key or shape, is an error listing it.

    Returns:
        The names of the tasks that were loaded.
    """
    expected = model.state_dict()
    loaded_tasks = sorted(
        {k.removeprefix(CKPT_PATCHES).split(".")[0] for k in state if k.startswith(CKPT_PATCHES)}
        | {k.split(".")[1] for k in state if k.startswith("heads.")}
    )
    new_tasks = [t for t in model.task_names if t not in loaded_tasks]
    fresh = tuple(f"{CKPT_PATCHES}{t}." for t in new_tasks) + tuple(f"heads.{t}." for t in new_tasks)
    missing = sorted(k for k in expected if k not in state and not k.startswith(fresh))
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise CheckpointMismatchError(
            f"{path} does not fit this model (tasks in checkpoint: {', '.join(loaded_tasks)}); "
            + "; ".join(parts)
            + ". Check backbone, patch and each task's classes against the run that made it."
        )
    model.load_state_dict(dict(state), strict=False)
    return loaded_tasks


def resume_path(cfg: DictConfig) -> str | None:
    """What ``Trainer.fit`` resumes from: ``ckpt_path``; else, with ``resume: true``, Lightning's ``"last"``
    (the newest ``last.ckpt`` of the run's ModelCheckpoint folder, ``<output_dir>/checkpoints``; nothing
    on a fresh run, with the warning ``NO_LAST_CHECKPOINT``)."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    return "last" if cfg.get("resume", True) else None


NO_LAST_CHECKPOINT = r'.*ckpt_path="last"\) is set, but there is no last checkpoint available'

# The options a resumed run must share with the run that wrote its checkpoint (others, such as
# trainer.max_epochs, devices or loggers, may change on resume).
RESUME_KEYS = (
    "backbone",
    "patch",
    "task",
    "optim",
    "data.batch_size",
    "seed",
    "channels_last",
    "lean_backward",
    "init_from",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
)


def resume_file(cfg: DictConfig) -> Path | None:
    """The checkpoint file ``resume_path`` makes Lightning resume from, if it exists."""
    path = resume_path(cfg)
    if path is None:
        return None
    if path != "last":
        return Path(to_absolute_path(path))
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    last = Path(checkpoint.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints") / "last.ckpt"
    return last if last.is_file() else None


def check_resume(cfg: DictConfig) -> None:
    """Refuse to resume from a checkpoint written under other options (``RESUME_KEYS``), naming each."""
    path = resume_file(cfg)
    if path is None or not path.is_file():
        return
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved = ckpt["hyper_parameters"]["meta"]["config"]
    except Exception as err:
        raise ConfigError(
            f"cannot resume from {path}: not a modelpatch checkpoint ({type(err).__name__}); "
            "delete it or run with resume=false to start fresh"
        ) from err
    from omegaconf import OmegaConf

    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = []
    for key in RESUME_KEYS:
        before, after = _lookup(saved, key), _lookup(now, key)
        if before != after:
            diffs.extend(_differences(key, before, after))
    if diffs:
        how = "drop ckpt_path" if cfg.get("ckpt_path") else f"resume=false to start fresh (overwrites {path.parent})"
        raise ConfigError(
            f"cannot resume from {path}: it was written with other options: {'; '.join(diffs)}. "
            f"Run with the checkpoint's options to resume, or {how}"
        )


def _lookup(tree: object, key: str) -> object:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


def _differences(key: str, before: object, after: object) -> list[str]:
    """``key: <checkpoint> in the checkpoint, <now> now`` for each differing leaf."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        out = []
        for k in sorted(set(before) | set(after), key=str):
            if before.get(k) != after.get(k):
                out.extend(_differences(f"{key}.{k}", before.get(k), after.get(k)))
        return out
    return [f"{key}={before!r} in the checkpoint, {after!r} now"]


def read_init_checkpoint(cfg: DictConfig) -> tuple[dict, dict, str] | None:
    """The ``init_from`` checkpoint (state dict, hyper-parameters, path), checked against cfg."""
    if not cfg.get("init_from"):
        return None
    path = to_absolute_path(str(cfg.init_from))
    if cfg.backbone.weights is not None:
        raise ConfigError("set either init_from (a whole multi-task model) or backbone.weights, not both")
    if not Path(path).is_file():
        raise ConfigError(f"init_from checkpoint {path} does not exist")
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    if "tasks" not in hp or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a modelpatch checkpoint (no tasks in its hyper-parameters)")
    want = {
        "backbone": cfg.backbone.name,
        "backbone.width": cfg.backbone.width,
        "patch": cfg.patch.kind,
        "patch.norm_stats": cfg.patch.norm_stats,
    }
    have = {
        "backbone": hp["backbone"]["name"],
        "backbone.width": hp["backbone"]["width_mult"],
        "patch": hp["patch"]["kind"],
        "patch.norm_stats": hp["patch"]["norm_stats"],
    }
    diffs = [f"{k}={have[k]} in the checkpoint but {want[k]} here" for k in want if have[k] != want[k]]
    if diffs:
        raise ConfigError(f"init_from {path} does not match this run: {'; '.join(diffs)}")
    return ckpt["state_dict"], hp, path


def make_results(
    cfg: DictConfig, model: PatchModule, metrics: dict[str, float], *, wall_time_s: float, checkpoint: str = ""
) -> dict:
    """The ``results.json`` object (see docs/architecture.md for the contract)."""
    from modelpatch.serving import patch_bytes

    counts = model.parameter_counts()
    tasks = {}
    for name, head in model.tasks.items():
        tasks[name] = {
            "test_acc": metrics.get(f"test/{name}/acc"),
            "val_acc": metrics.get(f"val/{name}/acc"),
            "num_classes": head.num_classes,
            "params_patch": counts[f"{name}/patch"],
            "params_head": counts[f"{name}/head"],
            "patch_bytes": patch_bytes(model, name),
            "train_size": head.spec.get("train_size"),
            "train_samples": head.train_samples,
            "frozen": name in model.frozen_tasks,
        }
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    backbone = model.model.backbone
    return {
        "backbone": {
            "name": backbone.name,
            "width": backbone.width_mult,
            "features": backbone.width,
            "weights": backbone.weights_source,
        },
        "patch": model.patch.kind,
        "norm_stats": model.patch.norm_stats,
        "train_shared": model.model.train_shared,
        "tasks": tasks,
        "params": {
            **{k: counts[k] for k in ("total", "trainable", "shared", "backbone", "separate_models")},
            "ratio_vs_separate": round(counts["total"] / counts["separate_models"], 4),
        },
        "init_from": model.hparams.get("init_from"),
        "mixing": model.mixing.name,
        "test_acc": metrics.get("test/acc"),
        "val_acc": metrics.get("val/acc"),
        "seed": cfg.seed,
        "epochs": cfg.trainer.get("max_epochs"),
        "wall_time_s": round(wall_time_s, 2),
        "overrides": overrides,
        "checkpoint": checkpoint,
        "output_dir": str(cfg.paths.output_dir),
    }


def write_json(path: Path, obj: dict) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
