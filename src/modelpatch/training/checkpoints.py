"""Checkpoints: reading a backbone or tasks out of a run's checkpoint, resuming, and ``init_from``.
Where a checkpoint keeps what: ``training.state_keys``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from modelpatch.config import ConfigError
from modelpatch.models.backbones import PRETRAINED, BackboneError
from modelpatch.models.state_dicts import compare_keys
from modelpatch.training.state_keys import CKPT_BACKBONE, CKPT_PATCHES, patch_tasks, split_patch_key

if TYPE_CHECKING:
    from modelpatch.training.module import PatchModule


def backbone_state_from_checkpoint(ckpt: Mapping, path: os.PathLike | str) -> dict[str, torch.Tensor]:
    """The backbone a one-task checkpoint of this platform learned: shared weights with the
    task's patch applied (a multi-task checkpoint is ambiguous and refused)."""
    state = ckpt["state_dict"]
    tasks = patch_tasks(state)
    if len(tasks) > 1:
        raise BackboneError(
            f"{path} is a multi-task checkpoint (tasks: {', '.join(tasks)}); export one task's "
            "backbone or load it with eval.py instead"
        )
    if not tasks and not any(k.startswith(CKPT_BACKBONE) for k in state):
        raise BackboneError(f"{path} is a Lightning checkpoint, but not one made by modelpatch")
    out = {k.removeprefix(CKPT_BACKBONE): v for k, v in state.items() if k.startswith(CKPT_BACKBONE)}
    out.update({split_patch_key(k)[1]: v for k, v in state.items() if k.startswith(CKPT_PATCHES)})
    return out


def transform_input_from_hparams(hp: Mapping) -> bool | None:
    """The ``transform_input`` a modelpatch checkpoint's hyper-parameters record (older checkpoints:
    on when the run started from torchvision's weights)."""
    backbone = hp.get("backbone", {})
    if backbone.get("transform_input") is not None:
        return bool(backbone["transform_input"])
    if backbone.get("name") != "inception_v3":
        return None
    return hp.get("meta", {}).get("config", {}).get("backbone", {}).get("weights") in PRETRAINED


class CheckpointMismatchError(ValueError):
    """A checkpoint's tasks, patches or heads do not fit the model being built."""


def load_tasks_from_checkpoint(model: PatchModule, state: Mapping[str, torch.Tensor], path: str) -> list[str]:
    """Load the shared backbone and every task the checkpoint holds into ``model``.

    The model may have tasks the checkpoint lacks (new tasks keep their fresh patch and head);
    anything else that does not match, key or shape, is an error listing it.

    Returns:
        The names of the tasks that were loaded.
    """
    loaded_tasks = sorted(set(patch_tasks(state)) | {k.split(".")[1] for k in state if k.startswith("heads.")})
    new_tasks = [t for t in model.task_names if t not in loaded_tasks]
    fresh = tuple(f"{CKPT_PATCHES}{t}." for t in new_tasks) + tuple(f"heads.{t}." for t in new_tasks)
    mismatch = compare_keys(model.state_dict(), state, optional=fresh)
    if mismatch:
        raise CheckpointMismatchError(
            f"{path} does not fit this model (tasks in checkpoint: {', '.join(loaded_tasks)}); {mismatch.describe()}. "
            "Check backbone, patch and each task's classes against the run that made it."
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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved = ckpt["hyper_parameters"]["meta"]["config"]
    except Exception as err:
        raise ConfigError(
            f"cannot resume from {path}: not a modelpatch checkpoint ({type(err).__name__}); "
            "delete it or run with resume=false to start fresh"
        ) from err
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
