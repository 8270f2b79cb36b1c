"""Gather ``results.json`` files into one table (markdown, CSV) and a parameters-vs-accuracy plot.

python -m modelpatch.report <folder> [--out <folder>] [--no-plot] [--wandb [--wandb-project <name>]]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from modelpatch.checkpoints import RESULTS_FILE

COLUMNS = ("task", "patch", "backbone", "params_task", "params_total", "test_acc", "val_acc", "run")
PATCH_ORDER = ("logits", "bias", "bn", "dw", "bn+bias", "bn+dw", "dw+bias", "bn+dw+bias", "full")


def collect(root: str | Path) -> list[dict]:
    """Every ``results.json`` under ``root`` (each with ``run``: its folder relative to root)."""
    root = Path(root)
    results = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        data = json.loads(path.read_text())
        data["run"] = str(path.parent.relative_to(root)) or "."
        results.append(data)
    return results


def rows(results: list[dict]) -> list[dict]:
    """One row per (run, task). ``params_task`` is what the task adds: its patch and its head."""
    out = []
    for r in results:
        for task, t in r["tasks"].items():
            out.append(
                {
                    "task": task,
                    "patch": r["patch"],
                    "backbone": f"{r['backbone']['name']}@{r['backbone']['width']}",
                    "params_task": t["params_patch"] + t["params_head"],
                    "params_total": r["params"]["total"],
                    "test_acc": t.get("test_acc"),
                    "val_acc": t.get("val_acc"),
                    "run": r["run"],
                }
            )
    return sorted(out, key=lambda x: (x["task"], x["backbone"], _patch_rank(x["patch"]), x["params_task"]))


def _patch_rank(kind: str) -> int:
    return PATCH_ORDER.index(kind) if kind in PATCH_ORDER else len(PATCH_ORDER)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def to_markdown(table: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|\n"
    return head + "".join("| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |\n" for row in table)


def write_csv(table: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both fewer parameters and higher accuracy, by parameters."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot(table: list[dict], path: Path) -> None:
    """Log-scaled parameters a task adds (x) against test accuracy (y), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in table if r["test_acc"] is not None]
    tasks = sorted({r["task"] for r in table})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        sub = [r for r in table if r["task"] == task]
        for backbone in sorted({r["backbone"] for r in sub}):
            pts = [r for r in sub if r["backbone"] == backbone]
            ax.scatter([r["params_task"] for r in pts], [r["test_acc"] for r in pts], label=backbone, zorder=3)
            for r in pts:
                ax.annotate(
                    r["patch"], (r["params_task"], r["test_acc"]), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
        front = pareto_front([(r["params_task"], r["test_acc"]) for r in sub])
        ax.plot(*zip(*front, strict=True), "--", color="grey", lw=1, label="Pareto front", zorder=2)
        ax.set_xscale("log")
        ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
        ax.set_xlabel("parameters the task adds (patch + head)")
        ax.set_ylabel("test accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(root: str | Path, out: str | Path | None = None, *, with_plot: bool = True) -> tuple[list[dict], Path]:
    """Write ``report.md``, ``report.csv`` (and ``report.png``) for the runs under ``root``."""
    root = Path(root)
    results = collect(root)
    if not results:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {root}: point the report at a run or multirun folder")
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    table = rows(results)
    (out / "report.md").write_text(to_markdown(table))
    write_csv(table, out / "report.csv")
    if with_plot:
        plot(table, out / "report.png")
    return table, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelpatch.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder holding results.json files (a run or a multirun)")
    parser.add_argument("--out", help="where to write report.md/.csv/.png (default: root)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument("--wandb", action="store_true", help="also log table and plot to a W&B run")
    parser.add_argument("--wandb-project", default="modelpatch", help="W&B project for --wandb (default: modelpatch)")
    args = parser.parse_args(argv)
    try:
        table, out = report(args.root, args.out, with_plot=not args.no_plot)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    print(f"written: {out / 'report.md'}, {out / 'report.csv'}" + ("" if args.no_plot else f", {out / 'report.png'}"))
    if args.wandb:
        from modelpatch.wandb_utils import log_report

        png = None if args.no_plot else out / "report.png"
        run_dir = log_report(table, COLUMNS, png, project=args.wandb_project, name=f"report-{out.name}", save_dir=out)
        print(f"W&B run: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
