"""Weights & Biases specifics: the summaries of a training run, and the report as a W&B run.

``wandb`` is imported only here and only when used (it is an optional dependency: ``.[cluster]``). Registers the
resolver ``${mp.wandb_run_id:<output dir>,<resume>}`` (``conf/logger/wandb.yaml``'s run id).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

SUMMARY_MAX = ("val/acc_best",)  # best so far, whatever epoch it came from (what a sweep maximizes)


def stable_run_id(output_dir: str, resume: Any = True) -> str | None:
    """The W&B run id of the run in ``output_dir``: the same each time the run starts there (a requeued SLURM
    job, a rerun that resumes from its checkpoint), so that W&B continues it (``resume="allow"``) instead of
    starting another run. Under ``wandb agent``, the agent's id; with ``resume=false``, ``None`` (a new run)."""
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    if str(resume).lower() in ("false", "none"):
        return None
    return hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]


if not OmegaConf.has_resolver("mp.wandb_run_id"):
    OmegaConf.register_new_resolver("mp.wandb_run_id", stable_run_id)


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
