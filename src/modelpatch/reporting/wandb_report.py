"""The report as a W&B run (``python -m modelpatch.report --wandb``); ``wandb`` is imported only when used."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
