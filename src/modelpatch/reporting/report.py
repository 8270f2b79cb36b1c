"""Gather ``results.json`` files into one table (markdown, CSV) and a parameters-vs-accuracy plot.

python -m modelpatch.report <folder> [--out <folder>] [--no-plot] [--wandb [--wandb-project <name>]]

Runs that differ only in their seed are averaged (mean ± sample std, n); each Pareto front holds one
backbone and one setting (weights, normalization statistics, shared training, tasks trained together).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import textwrap
from pathlib import Path

from modelpatch.atomic import atomic_write
from modelpatch.config import override_key
from modelpatch.files.results import RESULTS_FILE

COLUMNS = (
    "task", "patch", "backbone", "weights", "norm_stats", "train_shared", "run_tasks", "seed",
    "params_task", "params_total", "test_acc", "val_acc", "run",
)  # fmt: skip
# One row per setting: the runs that differ only in their seed, as mean, sample std and count.
MEAN_COLUMNS = (
    "task", "patch", "backbone", "weights", "norm_stats", "train_shared", "run_tasks", "params_task",
    "params_total", "test_acc", "test_acc_std", "val_acc", "val_acc_std", "n", "seeds", "overrides",
)  # fmt: skip
SETTING = ("backbone", "weights", "norm_stats", "train_shared", "run_tasks")  # one Pareto front each
PATCH_ORDER = ("logits", "bias", "bn", "dw", "bn+bias", "bn+dw", "dw+bias", "bn+dw+bias", "full")
# overrides that do not change what a run learns (or are columns already): left out of a setting
NOT_SETTING = (
    "seed",
    "paths.",
    "hydra.",
    "logger",
    "extras.",
    "threads",
    "data.num_workers",
    "trainer.enable_progress_bar",
)
COLUMN_KEYS = ("patch", "backbone", "backbone.weights", "patch.norm_stats", "patch.train_shared")


def collect(root: str | Path) -> list[dict]:
    """Every ``results.json`` under ``root`` (each with ``run``: its folder relative to root)."""
    root = Path(root)
    results = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        data = json.loads(path.read_text())
        data["run"] = str(path.parent.relative_to(root)) or "."
        results.append(data)
    return results


def setting_overrides(overrides: list[str]) -> str:
    """A run's overrides that make its setting (not its seed, paths, logging, or what the columns show)."""
    keep = [o for o in overrides if not override_key(o).startswith(NOT_SETTING) and override_key(o) not in COLUMN_KEYS]
    return " ".join(sorted(keep))


def rows(results: list[dict]) -> list[dict]:
    """One row per (run, task). ``params_task`` is what the task adds: its patch and its head;
    ``run_tasks``, how many tasks the run trained together."""
    out = []
    for r in results:
        for task, t in r["tasks"].items():
            out.append(
                {
                    "task": task,
                    "patch": r["patch"],
                    "backbone": f"{r['backbone']['name']}@{r['backbone']['width']}",
                    "weights": _short(r["backbone"].get("weights")),
                    "norm_stats": r.get("norm_stats"),
                    "train_shared": r.get("train_shared"),
                    "run_tasks": len(r["tasks"]),
                    "seed": r.get("seed"),
                    "params_task": t["params_patch"] + t["params_head"],
                    "params_total": r["params"]["total"],
                    "test_acc": t.get("test_acc"),
                    "val_acc": t.get("val_acc"),
                    "run": r["run"],
                    "overrides": setting_overrides(r.get("overrides", [])),
                    "tasks_of_run": tuple(sorted(r["tasks"])),
                }
            )
    return sorted(out, key=_order)


def _short(weights: str | None) -> str | None:
    """A checkpoint path as its last three parts (``pretrain/checkpoints/last.ckpt``)."""
    return "/".join(Path(weights).parts[-3:]) if weights and "/" in weights else weights


def _order(row: dict):
    return (row["task"], row["backbone"], str(row["weights"]), _patch_rank(row["patch"]), row["params_task"])


def aggregate(table: list[dict]) -> list[dict]:
    """Rows that differ only in their seed (and run folder), as one: mean, sample std (``None`` for one
    run) and ``n`` of test and val accuracy."""
    groups: dict[tuple, list[dict]] = {}
    keep = [c for c in MEAN_COLUMNS if c in COLUMNS and not c.endswith("_acc")] + ["overrides", "tasks_of_run"]
    for row in table:
        groups.setdefault(tuple(str(row[c]) for c in keep), []).append(row)
    out = []
    for members in groups.values():
        row = {c: members[0][c] for c in keep}
        for metric in ("test_acc", "val_acc"):
            values = [m[metric] for m in members if m[metric] is not None]
            row[metric] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        row["n"] = len(members)
        row["seeds"] = ",".join(str(m["seed"]) for m in sorted(members, key=lambda m: str(m["seed"])))
        out.append(row)
    return sorted(out, key=_order)


def _patch_rank(kind: str) -> int:
    return PATCH_ORDER.index(kind) if kind in PATCH_ORDER else len(PATCH_ORDER)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cell(row: dict, column: str) -> str:
    """Means with their spread: ``0.8502 ± 0.0040``."""
    std = row.get(f"{column}_std")
    return f"{_fmt(row[column])} ± {std:.4f}" if std is not None and row[column] is not None else _fmt(row[column])


def to_markdown(table: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    columns = tuple(c for c in columns if not c.endswith("_std"))
    head = "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n"
    return head + "".join("| " + " | ".join(_cell(row, c) for c in columns) + " |\n" for row in table)


def write_csv(table: list[dict], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(table)

    atomic_write(path, write)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both fewer parameters and higher accuracy, by parameters."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def setting_label(row: dict) -> str:
    """What a Pareto front holds fixed, in words: backbone, weights, statistics, shared training, tasks, and
    the overrides that make the setting (a rate swept: a front per rate)."""
    parts = [row["backbone"], str(row["weights"]), f"norm_stats={row['norm_stats']}"]
    parts += ["train_shared"] * bool(row["train_shared"]) + [f"{row['run_tasks']} tasks"] * (row["run_tasks"] > 1)
    parts += [row["overrides"]] * bool(row.get("overrides"))
    return ", ".join(parts)


def fronts(means: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """The Pareto front of each (task, setting): patches compared on one backbone with one recipe, never
    pooled across backbones, starting weights, statistics, shared training or tasks trained together."""
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in means:
        if r["test_acc"] is not None:
            points.setdefault((r["task"], setting_label(r)), []).append((r["params_task"], r["test_acc"]))
    return {key: pareto_front(p) for key, p in points.items()}


def plot(means: list[dict], path: Path) -> None:
    """Log-scaled parameters a task adds (x) against mean test accuracy over seeds (y, with the std as an
    error bar), one panel per task, one colour and Pareto front per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [r for r in means if r["test_acc"] is not None]
    tasks = sorted({r["task"] for r in means})
    settings = sorted({setting_label(r) for r in means})
    colors = {s: f"C{i % 10}" for i, s in enumerate(settings)}
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4.4), squeeze=False)
    front_of = fronts(means)
    for ax, task in zip(axes[0], tasks, strict=False):
        for setting in settings:
            pts = [r for r in means if r["task"] == task and setting_label(r) == setting]
            if not pts:
                continue
            xs, ys = [r["params_task"] for r in pts], [r["test_acc"] for r in pts]
            err = [r["test_acc_std"] or 0.0 for r in pts]
            label = textwrap.fill(setting, 60)
            ax.errorbar(xs, ys, yerr=err, fmt="o", color=colors[setting], label=label, zorder=3, capsize=2)
            for r in pts:
                label = r["patch"] + (f" (n={r['n']})" if r["n"] > 1 else "")
                ax.annotate(
                    label, (r["params_task"], r["test_acc"]), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
            front = front_of[(task, setting)]
            ax.plot(*zip(*front, strict=True), "--", color=colors[setting], lw=1, alpha=0.7, zorder=2)
        ax.set_xscale("log")
        ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
        ax.set_xlabel("parameters the task adds (patch + head)")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_title(f"{task} (dashed: Pareto front per setting)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def report(root: str | Path, out: str | Path | None = None, *, with_plot: bool = True) -> tuple[list[dict], Path]:
    """Write ``report.md`` (means over seeds, K tasks in one model against K models, every run),
    ``report.csv`` (runs), ``report_mean.csv`` (means), and the plots ``report.png`` and, when the runs
    hold a multi-task run and single-task runs of its tasks, ``multitask.png``."""
    from modelpatch.reporting.multitask import multitask_markdown, multitask_rows, plot_multitask

    root = Path(root)
    results = collect(root)
    if not results:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {root}: point the report at a run or multirun folder")
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    table = rows(results)
    means = aggregate(table)
    comparison = multitask_rows(means)
    text = "## Mean over seeds (± sample std)\n\n" + to_markdown(means, MEAN_COLUMNS)
    if comparison:
        text += "\n## K tasks: one model with K patches against K separate models\n\n" + multitask_markdown(comparison)
    markdown = text + "\n## Runs\n\n" + to_markdown(table)
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(markdown))
    write_csv(table, out / "report.csv")
    write_csv(means, out / "report_mean.csv", MEAN_COLUMNS)
    if with_plot:
        plot(means, out / "report.png")
        if comparison:
            plot_multitask(comparison, out / "multitask.png")
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
    print((out / "report.md").read_text())
    written = ["report.md", "report.csv", "report_mean.csv", "report.png", "multitask.png"]
    print("written: " + ", ".join(str(out / f) for f in written if (out / f).exists()))
    if args.wandb:
        from modelpatch.reporting.wandb_report import log_report

        png = None if args.no_plot else out / "report.png"
        run_dir = log_report(table, COLUMNS, png, project=args.wandb_project, name=f"report-{out.name}", save_dir=out)
        print(f"W&B run: {run_dir}")
    return 0
