"""Weights & Biases loggers of a training run: the summaries each run declares and the tested model's values.

``wandb`` itself is never imported here (it is an optional dependency: ``.[cluster]``); the run id comes from
the resolver ``${mp.wandb_run_id:...}`` (``modelpatch.resolvers``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

SUMMARY_MAX = ("val/acc_best",)  # best so far, whatever epoch it came from (what a sweep maximizes)


def wandb_loggers(loggers: Iterable[Any]) -> list:
    """The ``WandbLogger``s among a trainer's loggers."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning always has it; wandb itself may be missing
        return []
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def setup_wandb(loggers: Iterable[Any], task_names: Sequence[str]) -> None:
    """Declare the summaries of every W&B run: the maximum of ``SUMMARY_MAX``, the minimum of each
    ``val/<task>/loss``, and the last ``val/acc`` and ``val/<task>/acc`` (``summarize_tested`` sets them to
    the tested model's at the end)."""
    for logger in wandb_loggers(loggers):
        run = logger.experiment  # starts the run (rank zero; elsewhere a no-op object)
        if not hasattr(run, "define_metric"):
            continue
        for name in SUMMARY_MAX:
            run.define_metric(name, step_metric="trainer/global_step", summary="max")
        for name in ("val/acc", *(f"val/{t}/acc" for t in task_names)):
            run.define_metric(name, step_metric="trainer/global_step", summary="last")
        for t in task_names:
            run.define_metric(f"val/{t}/loss", step_metric="trainer/global_step", summary="min")


def summarize_tested(loggers: Iterable[Any], metrics: dict[str, float]) -> None:
    """Set the summary ``val/acc`` and ``val/<task>/acc`` of every W&B run to those of the model that was
    tested and exported (the best checkpoint), as ``results.json`` records them. Global rank 0 only: other
    ranks' loggers hold a dummy run."""
    if rank_zero_only.rank != 0:
        return
    for logger in wandb_loggers(loggers):
        run = logger.experiment
        if not hasattr(run, "summary"):
            continue
        for key, value in metrics.items():
            if key.startswith("val/") and key.endswith("/acc"):
                run.summary[key] = value
