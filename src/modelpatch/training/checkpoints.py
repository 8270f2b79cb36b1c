"""Checkpoints: reading a backbone or tasks out of a run's checkpoint, and ``init_from`` (resuming:
``training.resume``). Where a checkpoint keeps what: ``training.state_keys``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

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
