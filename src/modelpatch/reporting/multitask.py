"""The paper's headline as a picture: K tasks in one model (shared weights + K patches) against K models.

From the report's rows averaged over seeds: each multi-task setting (a run that trained K >= 2 tasks
together) beside each single-task setting on the same backbone that has runs of all K of its tasks
(one recipe, one task per run). For each: the parameters it takes to serve all K tasks (the multi-task
model's total; the sum of the K single-task models' totals) and test accuracy, per task and their mean.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from modelpatch.atomic import atomic_write
from modelpatch.config import override_key

TASK_KEYS = ("task", "task.name", "task.tasks")  # overrides that only say which task a run trained


def _recipe(overrides: str) -> str:
    return " ".join(o for o in overrides.split() if override_key(o) not in TASK_KEYS)


def _entry(tasks: tuple[str, ...], label: str, kind: str, params: int, by_task: dict[str, dict]) -> dict:
    accs = {t: by_task[t]["test_acc"] for t in tasks}
    return {
        "tasks": tasks,
        "model": label,
        "kind": kind,
        "params": params,
        "mean_acc": statistics.fmean(accs.values()) if None not in accs.values() else None,
        "accs": accs,
        "stds": {t: by_task[t]["test_acc_std"] for t in tasks},
        "n": min(by_task[t]["n"] for t in tasks),
    }


def multitask_rows(means: list[dict]) -> list[dict]:
    """One entry per model that serves the K tasks of a multi-task run: the multi-task model itself, then
    each set of K single-task models (``kind`` ``multi`` / ``separate``), with ``params`` for all K tasks."""
    multi: dict[tuple, dict[str, dict]] = {}
    single: dict[tuple, dict[str, dict]] = {}
    for r in means:
        if r["run_tasks"] > 1:
            key = (r["tasks_of_run"], r["backbone"], r["weights"], r["patch"], r["norm_stats"], r["train_shared"])
            multi.setdefault((*key, r["overrides"]), {})[r["task"]] = r
        else:
            key = (r["backbone"], r["weights"], r["patch"], r["norm_stats"], r["train_shared"], _recipe(r["overrides"]))
            single.setdefault(key, {})[r["task"]] = r
    out = []
    for (tasks, backbone, *_), by_task in sorted(multi.items(), key=lambda kv: str(kv[0])):
        one = by_task[tasks[0]]
        k = len(tasks)
        separate = [
            _entry(tasks, f"{k} separate {bb} ({patch})", "separate", sum(runs[t]["params_total"] for t in tasks), runs)
            for (bb, _, patch, *_), runs in sorted(single.items(), key=lambda kv: str(kv[0]))
            if bb == backbone and all(t in runs for t in tasks)
        ]
        if separate:  # nothing to compare with otherwise
            out += [_entry(tasks, f"1 {backbone} + {k} {one['patch']} patches", "multi", one["params_total"], by_task)]
            out += separate
    return out


def multitask_markdown(entries: list[dict]) -> str:
    head = "| tasks | model | parameters for all K tasks | mean test acc | per task (mean ± std over seeds) | n |\n"
    head += "|---|---|---|---|---|---|\n"
    lines = []
    for e in entries:
        per_task = "; ".join(
            f"{t} {e['accs'][t]:.4f}" + (f" ± {e['stds'][t]:.4f}" if e["stds"][t] is not None else "")
            for t in e["tasks"]
        )
        mean = "-" if e["mean_acc"] is None else f"{e['mean_acc']:.4f}"
        lines.append(f"| {', '.join(e['tasks'])} | {e['model']} | {e['params']:,} | {mean} | {per_task} | {e['n']} |\n")
    return head + "".join(lines)


def plot_multitask(entries: list[dict], path: Path) -> None:
    """Parameters for all K tasks (log x) against test accuracy: a large marker for the mean over the
    tasks, small ones (with the std over seeds) for each task; one panel per set of tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    groups = sorted({e["tasks"] for e in entries if e["mean_acc"] is not None})
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(9 * max(1, len(groups)), 4.6), squeeze=False)
    markers = "s^vDP*Xph"
    for ax, tasks in zip(axes[0], groups, strict=False):
        sub = [e for e in entries if e["tasks"] == tasks and e["mean_acc"] is not None]
        for i, e in enumerate(sub):
            color = f"C{i % 10}"
            ax.scatter([e["params"]], [e["mean_acc"]], s=140, color=color, zorder=4, label=f"{e['model']}: mean")
            for j, t in enumerate(tasks):
                ax.errorbar(
                    [e["params"]], [e["accs"][t]], yerr=[e["stds"][t] or 0.0], fmt=markers[j % len(markers)],
                    color=color, ms=5, alpha=0.75, capsize=2, zorder=3,
                )  # fmt: skip
            ax.annotate(
                e["model"], (e["params"], e["mean_acc"]), textcoords="offset points", xytext=(8, -3), fontsize=8
            )
        for j, t in enumerate(tasks):  # one legend entry per task marker, whatever the model's colour
            ax.scatter([], [], marker=markers[j % len(markers)], color="0.4", s=20, label=t)
        ax.set_xscale("log")
        millions = FuncFormatter(lambda x, _: f"{x / 1e6:g}M")
        ax.xaxis.set_major_formatter(millions)
        ax.xaxis.set_minor_formatter(millions)
        ax.margins(x=0.35, y=0.1)
        ax.set_xlabel(f"parameters to serve all {len(tasks)} tasks")
        ax.set_ylabel("test accuracy (large: mean over tasks)")
        ax.set_title(f"{len(tasks)} tasks: one model with patches vs separate models", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over a point
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
