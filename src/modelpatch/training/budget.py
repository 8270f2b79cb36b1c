"""The training budget: ``trainer.min_steps`` lengthens an epoch budget that is too short for a small task.

Lightning stops at ``max_epochs`` even before ``min_steps`` (which only holds off early stopping). Here a run
whose ``max_epochs`` make fewer optimizer steps than ``min_steps`` runs every epoch of its budget ``r`` times
(``max_epochs * r`` epochs, the least ``r`` that reaches ``min_steps``) and validates every ``r`` epochs: as many
validations as ``max_epochs`` asked for, the last one at the end. A run with ``max_steps`` set keeps it.
"""

from __future__ import annotations

import math

import lightning as L


def repeats_for_min_steps(max_epochs: int, epoch_steps: int, min_steps: int) -> int:
    """How many times each epoch of the budget runs so that ``max_epochs`` of ``epoch_steps`` optimizer steps
    make at least ``min_steps``: 1 when they already do."""
    if min_steps <= 0 or max_epochs <= 0 or epoch_steps <= 0:
        return 1
    return max(1, math.ceil(min_steps / (max_epochs * epoch_steps)))


def limited_batches(batches: int, limit: int | float | None) -> int:
    """Training batches an epoch runs under ``trainer.limit_train_batches`` (Lightning's rule: an int caps,
    a float is a fraction)."""
    if limit is None:
        return batches
    if isinstance(limit, int):
        return min(batches, limit)
    return max(1, int(batches * limit)) if limit > 0 else 0


def apply_min_steps(trainer: L.Trainer, epoch_batches: int) -> str | None:
    """Lengthen ``trainer``'s epoch budget to its ``min_steps`` (see the module); ``epoch_batches``: training
    batches per epoch and rank. Returns the line to log when it did, else ``None``."""
    loop = trainer.fit_loop
    min_steps = loop.min_steps or 0
    max_epochs = loop.max_epochs
    if min_steps <= 0 or loop.max_steps not in (-1, None) or max_epochs is None or max_epochs <= 0:
        return None
    batches = limited_batches(epoch_batches, trainer.limit_train_batches)
    epoch_steps = math.ceil(batches / trainer.accumulate_grad_batches)
    repeats = repeats_for_min_steps(max_epochs, epoch_steps, min_steps)
    if repeats == 1:
        return None
    loop.max_epochs = max_epochs * repeats
    by_epoch = trainer.check_val_every_n_epoch is not None and isinstance(trainer.val_check_interval, float)
    if by_epoch:
        trainer.check_val_every_n_epoch *= repeats
    validation = f", validating every {trainer.check_val_every_n_epoch} epochs" if by_epoch else ""
    return (
        f"trainer.min_steps={min_steps}: {max_epochs} epochs of {epoch_steps} steps are {max_epochs * epoch_steps} "
        f"steps; each runs {repeats} times: {loop.max_epochs} epochs ({loop.max_epochs * epoch_steps} steps)"
        f"{validation} (trainer.min_steps=0: as many epochs as trainer.max_epochs)"
    )
