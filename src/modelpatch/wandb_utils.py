"""Weights & Biases specifics: best-so-far summaries for a training run, and the report as a W&B run.

``wandb`` is imported only here and only when used (it is an optional dependency: ``.[cluster]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SUMMARY_MAX = ("val/acc",)


def wandb_loggers(loggers: Iterable[Any]) -> list:
    """The ``WandbLogger``s among a trainer's loggers."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning always has it; wandb itself may be missing
        return []
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def setup_wandb(loggers: Iterable[Any], task_names: Sequence[str]) -> None:
    """Declare the summaries of every W&B run: the maximum of ``val/acc`` and of each ``val/<task>/acc``
    (the best so far, whatever epoch it came from), and the minimum of ``val/<task>/loss``."""
    for logger in wandb_loggers(loggers):
        run = logger.experiment  # starts the run (rank zero; elsewhere a no-op object)
        if not hasattr(run, "define_metric"):
            continue
        for name in (*SUMMARY_MAX, *(f"val/{t}/acc" for t in task_names)):
            run.define_metric(name, step_metric="trainer/global_step", summary="max")
        for t in task_names:
            run.define_metric(f"val/{t}/loss", step_metric="trainer/global_step", summary="min")


def log_report(
    table: list[dict],
    columns: Sequence[str],
    png: Path | None,
    *,
    project: str = "modelpatch",
    name: str | None = None,
    group: str | None = None,
    save_dir: Path | None = None,
) -> str:
    """Log the report table (a ``wandb.Table``) and its plot to a new W&B run (``job_type=report``).

    Returns:
        The run's local folder (the offline run folder when ``WANDB_MODE=offline``).
    """
    import wandb

    save_dir = str(save_dir) if save_dir else None
    run = wandb.init(project=project, name=name, group=group, job_type="report", dir=save_dir)
    try:
        data = [[row[c] for c in columns] for row in table]
        payload: dict[str, Any] = {"report/table": wandb.Table(columns=list(columns), data=data)}
        if png is not None and Path(png).exists():
            payload["report/params_vs_accuracy"] = wandb.Image(str(png))
        run.log(payload)
        best = max((r for r in table if r.get("test_acc") is not None), key=lambda r: r["test_acc"], default=None)
        if best is not None:
            run.summary["best/test_acc"] = best["test_acc"]
            run.summary["best/patch"] = best["patch"]
            run.summary["best/params_task"] = best["params_task"]
        return str(Path(run.dir).parent)
    finally:
        run.finish()
