"""The optimizer and its schedule: ``optim.*`` of the run config (``conf/optim/``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    """Optimizer and schedule. ``None`` learning rates fall back to ``lr`` (``0.0`` is a rate: frozen); ``lr="auto"``:
    the learning-rate finder sets every rate before training (``training.lr_find``)."""

    name: str = "sgd"
    lr: float | str = 0.05
    patch_lr: float | None = None
    head_lr: float | None = None
    shared_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    patch_weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0


OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULERS = ("cosine", "constant")


def check_optim(optim: OptimConfig) -> None:
    """Names and values of ``optim.*`` that cannot be trained with: an error naming the option."""
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim.name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if optim.scheduler not in SCHEDULERS:
        raise ValueError(f"optim.scheduler={optim.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    if isinstance(optim.lr, str) and optim.lr != "auto":
        raise ValueError(f"optim.lr={optim.lr!r}: set a rate >= 0, or auto (Lightning's learning-rate finder)")
    for key in ("lr", "patch_lr", "head_lr", "shared_lr", "warmup_epochs"):
        value = getattr(optim, key)
        if isinstance(value, str) and key != "lr":
            raise ValueError(f"optim.{key}={value!r}: set a rate >= 0, or null (optim.lr)")
        if value is not None and not isinstance(value, str) and value < 0:
            raise ValueError(f"optim.{key}={value} is negative; use a rate >= 0 (null: optim.lr)")


def make_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names, over parameter groups that each set their own ``lr`` and decay."""
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.momentum > 0)
    if optim.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=optim.lr, momentum=optim.momentum)
    return torch.optim.Adam(groups, lr=optim.lr)


def rate(value: float | None, default: float | str) -> float:
    """A group's learning rate: its own when set (``0.0`` too), else ``default``."""
    chosen = default if value is None else value
    if isinstance(chosen, str):
        raise ValueError(f"optim.lr={chosen}: the learning-rate finder sets it before training (run.train)")
    return chosen


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: ``warmup`` steps rising linearly to the base rate (step ``s``: ``(s + 1) / warmup``),
    then a cosine decay to 0 at step ``total``."""
    schedulers = torch.optim.lr_scheduler
    if warmup == 0:
        return schedulers.CosineAnnealingLR(optimizer, T_max=max(1, total))
    linear = schedulers.LinearLR(optimizer, 1 / warmup, 1.0, total_iters=max(1, warmup - 1))
    cosine = schedulers.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    return schedulers.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
