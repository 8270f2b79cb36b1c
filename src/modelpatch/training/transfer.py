"""Sequential transfer: where the patch of a task added to a loaded model (``init_from``) starts.

A new task's patch starts as a copy of a source in the loaded model, chosen by ``init_patch_from``:
``base`` (the shared backbone's own values of the patched tensors) or the name of a loaded task (that
task's patch: its scales, biases, kernels and owned BatchNorm statistics). The default is what the
paper does when it fine-tunes a patch: start from the model the patch is applied to, i.e. from
``base`` when the loaded model's base holds learned values of the patched tensors (pretrained or
loaded weights that joint training left alone), and otherwise from the first loaded task, whose patch
was trained together with the shared weights (a base trained from scratch with
``patch.train_shared=true`` keeps its patched tensors at their random initialization: BatchNorm
scale 1, running variance 1, random depthwise kernels).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from modelpatch.config import ConfigError
from modelpatch.data.specs import TaskSpec
from modelpatch.training.checkpoints import load_tasks_from_checkpoint, transform_input_from_hparams

if TYPE_CHECKING:
    from modelpatch.training.module import PatchModule

log = logging.getLogger("modelpatch")

BASE = "base"


def base_weights_of(hp: Mapping) -> str:
    """Where the base of a checkpoint (its hyper-parameters ``hp``) got its values first: ``random``,
    ``imagenet``, ``coco`` or a path (an ``init_from`` run inherits its checkpoint's)."""
    if "init_from" in hp:
        return hp["init_from"]["base_weights"]
    weights = hp.get("backbone", {}).get("weights")
    if weights is None:  # checkpoints written before the field: the run's config says it
        weights = hp.get("meta", {}).get("config", {}).get("backbone", {}).get("weights")
    return "random" if weights is None else str(weights)


def base_has_learned_patch_values(hp: Mapping) -> bool:
    """Whether a checkpoint's base holds learned values of the patched tensors: weights that were
    loaded (not random) and not trained jointly with the patches."""
    if "init_from" in hp:  # a model made by init_from: as its own checkpoint's base
        return bool(hp["init_from"]["base_learned"])
    return base_weights_of(hp) != "random" and not hp.get("patch", {}).get("train_shared", False)


def default_patch_source(hp: Mapping, loaded: Sequence[str]) -> str:
    """The paper's choice (see the module docstring): ``base`` or the first loaded task."""
    return BASE if base_has_learned_patch_values(hp) or not loaded else loaded[0]


def choose_patch_source(requested: str | None, hp: Mapping, loaded: Sequence[str], path: str) -> str:
    """``init_patch_from`` checked against the loaded tasks; ``None`` picks the default."""
    if requested is None:
        return default_patch_source(hp, loaded)
    if requested != BASE and requested not in loaded:
        raise ConfigError(
            f"init_patch_from={requested!r} is not a task of {path}; choose one of: "
            f"{', '.join(sorted(loaded))}, or {BASE} (the shared backbone's own values), or null (default)"
        )
    return requested


@torch.no_grad()
def start_patches_from(model: PatchModule, tasks: Sequence[str], source: str) -> None:
    """Copy ``source``'s patched tensors (parameters and owned statistics) into each of ``tasks``."""
    if source == BASE:
        base = model.backbone
        values = {**dict(base.named_parameters()), **dict(base.named_buffers())}
    else:
        values = model.patches[source].tensors()
    for task in tasks:
        for name, tensor in model.patches[task].tensors().items():
            tensor.copy_(values[name])


def record(model: PatchModule, hp: Mapping, path: str, source: str, loaded: Sequence[str], new: Sequence[str]) -> dict:
    """What ``results.json`` and this run's checkpoint say of its ``init_from`` (``hp``: the loaded
    checkpoint's hyper-parameters)."""
    info = {
        "checkpoint": path,
        "init_patch_from": source,
        "loaded_tasks": list(loaded),
        "new_tasks": list(new),
        "base_weights": base_weights_of(hp),
        "base_learned": base_has_learned_patch_values(hp),
    }
    model.hparams["init_from"] = info
    return info


def plan(cfg: DictConfig, init: tuple | None, specs: list[TaskSpec]) -> tuple[str | None, list[TaskSpec]]:
    """Where the new tasks' patches start, and the tasks of the ``init_from`` checkpoint (``init``: state dict,
    hyper-parameters, path; ``read_init_checkpoint``) that this run keeps frozen."""
    if init is None:
        if cfg.get("init_patch_from") is not None:
            raise ConfigError("init_patch_from names where a task added by init_from starts: set init_from too")
        return None, []
    _, hp, path = init
    source = choose_patch_source(cfg.get("init_patch_from"), hp, [t["name"] for t in hp["tasks"]], path)
    names = {s.name for s in specs}
    kept = [TaskSpec(**t["spec"]) for t in hp["tasks"] if t["name"] not in names]
    if kept and cfg.patch.train_shared:
        raise ConfigError(
            f"patch.train_shared=true would change the outputs of the loaded tasks "
            f"({', '.join(s.name for s in kept)}); keep it false to add tasks to a trained model"
        )
    return source, kept


def load(model: PatchModule, init: tuple, source: str, kept: list[TaskSpec]) -> None:
    """Load the ``init_from`` checkpoint into ``model``, start the new tasks' patches, freeze the kept tasks."""
    state, hp, path = init
    loaded = load_tasks_from_checkpoint(model, state, path)
    model.backbone.weights_source = path
    model.backbone.restore_transform_input(transform_input_from_hparams(hp))
    new = [t for t in model.task_names if t not in loaded]
    start_patches_from(model, new, source)
    record(model, hp, path, source, loaded, new)
    model.freeze_tasks([s.name for s in kept])
    log.info(
        f"loaded tasks {', '.join(loaded)} from {path}; frozen: {', '.join(s.name for s in kept) or 'none'}; "
        f"new task(s) {', '.join(new) or 'none'} start from the patch of {source}"
    )
