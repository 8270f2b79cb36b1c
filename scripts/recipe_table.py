"""The recipe study's tables (docs/results.md#recipes): per training size and patch kind, the defaults before
the study, the defaults now, and the best recipe swept, each as the mean test accuracy over its seeds.

    python scripts/recipe_table.py runs/study [--csv docs/recipes.csv] [--plot docs/img/recipes.png]
    python scripts/recipe_table.py runs/study --backbone resnet18

A recipe is what a run trained with, read from its resolved ``config.yaml``: optimizer, the patch's and the
head's rate, ``trainer.min_steps``, ``trainer.max_epochs`` and ``optim.warmup_epochs``. Runs of one recipe that
differ in their seed are averaged. "best" is the recipe with the highest mean validation accuracy (the test
split chooses nothing); runs with ``optim.lr=auto`` have a column of their own (one recipe per seed: the
finder's rate). Stages that repeat a recipe and seed count it once (the first folder in path order); a repeat
that reached another accuracy (another thread count: another rounding) is reported on stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from modelpatch.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("logits", "bias", "bn", "dw", "bn+dw", "full")
OLD = ("sgd", 0.1, 0.05, 0, 8, 0.0)  # before the study: 8 epochs whatever the size, patch 0.1, head 0.05


def recipe(config: dict, result: dict) -> tuple:
    """(optimizer, patch rate, head rate, min_steps, max_epochs, warmup epochs) of a resolved run config; under
    ``optim.lr=auto`` the optimizer reads "<name> auto" and the rates are the finder's (results.json)."""
    optim, trainer = config["optim"], config["trainer"]
    budget = int(trainer.get("min_steps") or 0), trainer["max_epochs"], float(optim.get("warmup_epochs") or 0)
    if optim["lr"] == "auto":
        found = float(result["lr_find"]["lr"])
        return f"{optim['name']} auto", found, found, *budget
    patch_lr = optim["patch_lr"] if optim["patch_lr"] is not None else optim["lr"]
    head_lr = optim["head_lr"] if optim["head_lr"] is not None else optim["lr"]
    return optim["name"], float(patch_lr), float(head_lr), *budget


def default_recipe(kind: str) -> tuple:
    """The recipe ``python train.py experiment=transfer_fmnist_b patch=<kind>`` trains with (SGD)."""
    train = yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())
    patch = yaml.safe_load((ROOT / "conf" / "patch" / f"{kind}.yaml").read_text())
    trainer = yaml.safe_load((ROOT / "conf" / "trainer" / "default.yaml").read_text())
    lr = train["optim"]["lr"]
    patch_lr, head_lr = patch.get("lr", lr) or lr, patch.get("head_lr", lr) or lr
    return "sgd", float(patch_lr), float(head_lr), int(trainer["min_steps"]), 8, float(train["optim"]["warmup_epochs"])


def describe(r: tuple) -> str:
    name, patch_lr, head_lr, min_steps, epochs, warmup = r
    rates = f"{patch_lr:g}" if patch_lr == head_lr else f"{patch_lr:g}/{head_lr:g}"
    budget = (
        f"{epochs} ep"
        + (f", >= {min_steps} steps" if min_steps else "")
        + (f", warmup {warmup:g} ep" if warmup else "")
    )
    return f"{name} {rates}, {budget}"


def gather(root: Path, backbone: str = "mobilenet_v2") -> dict[tuple, dict]:
    """(size, kind, recipe) -> test and validation accuracies, seeds and parameters of one backbone's runs."""
    groups: dict[tuple, dict] = defaultdict(lambda: {"test": [], "val": [], "seeds": [], "runs": [], "params": 0})
    for path in sorted(root.rglob("results.json")):
        config_path = path.parent / "config.yaml"
        if not config_path.exists():
            continue
        config = yaml.safe_load(config_path.read_text())
        result = json.loads(path.read_text())
        if result["patch"] not in KINDS or config["task"].get("name") != "fmnist_b":
            continue
        if config.get("backbone", {}).get("name", "mobilenet_v2") != backbone:
            continue
        key = (config["task"]["train_size"], result["patch"], recipe(config, result))
        g = groups[key]
        run = str(path.parent.relative_to(root))
        if result["seed"] in g["seeds"]:
            first = g["seeds"].index(result["seed"])
            if g["test"][first] != result["test_acc"]:
                reached = f"test accuracy {result['test_acc']:.4f}, not {g['test'][first]:.4f}"
                print(
                    f"{run} repeats {g['runs'][first]} (seed {result['seed']}) with {reached}; counted once",
                    file=sys.stderr,
                )
            continue
        g["kind"] = result["patch"]
        g["test"].append(result["test_acc"])
        g["val"].append(result["val_acc"])
        g["seeds"].append(result["seed"])
        g["runs"].append(run)
        task = result.get("tasks", {}).get("fmnist_b", {})
        g["params"] = task.get("params_patch", 0) + task.get("params_head", 0)
    return groups


def mean(g: dict) -> float:
    return statistics.fmean(g["test"])


def cell(g: dict | None) -> str:
    if not g:
        return "not run"
    mean = statistics.fmean(g["test"])
    if len(g["test"]) == 1:
        return f"{mean:.4f} (1 seed)"
    return f"{mean:.4f} ± {statistics.stdev(g['test']):.4f} ({len(g['test'])})"


def chosen(mine: dict[tuple, dict]) -> dict[str, tuple]:
    """One kind's recipes at one size (recipe -> its runs): before the study, the defaults now, and the best
    swept by mean validation accuracy (``optim.lr=auto`` is not swept)."""
    kind = next(iter(mine.values()))["kind"]
    swept = [r for r in mine if not r[0].endswith(" auto")]
    best = max(swept, key=lambda r: statistics.fmean(mine[r]["val"]))
    return {"before the study": OLD, "defaults now": default_recipe(kind), "best swept": best}


def tables(groups: dict[tuple, dict]) -> str:
    sizes = sorted({size for size, _, _ in groups})
    out = []
    for size in sizes:
        out += [
            f"**{size:,} training images**",
            "",
            "| patch | before the study | defaults now | best swept (by val acc) | its recipe | defaults - best "
            "(points) | swept | lr=auto |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for kind in KINDS:
            mine = {r: g for (s, k, r), g in groups.items() if s == size and k == kind}
            if not mine:
                continue
            auto = [r for r in mine if r[0].endswith(" auto")]
            best, new = chosen(mine)["best swept"], default_recipe(kind)
            gap = f"{100 * (mean(mine[new]) - mean(mine[best])):+.1f}" if new in mine else "not run"
            found = "; ".join(f"{cell(mine[r])} at {r[1]:.2g}" for r in auto) or "not run"
            row = [
                kind,
                cell(mine.get(OLD)),
                cell(mine.get(new)),
                cell(mine[best]),
                describe(best),
                gap,
                str(len(mine) - len(auto)),
                found,
            ]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def write_csv(groups: dict[tuple, dict], path: Path) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["train_size", "patch", "optim", "patch_lr", "head_lr", "min_steps", "max_epochs",
                             "warmup_epochs", "test_acc", "val_acc", "n", "seeds", "runs"])  # fmt: skip
            for (size, kind, r), g in sorted(groups.items(), key=lambda item: (item[0][0], KINDS.index(item[0][1]))):
                test, val = round(statistics.fmean(g["test"]), 4), round(statistics.fmean(g["val"]), 4)
                writer.writerow(
                    [size, kind, *r, test, val, len(g["test"]), " ".join(map(str, g["seeds"])), " ".join(g["runs"])]
                )

    atomic_write(path, write)


def plot(groups: dict[tuple, dict], path: Path) -> None:
    """A panel per training size: parameters a kind adds (log x) against mean test accuracy (the sample std
    as an error bar), one series per recipe: before the study, the defaults now, the best swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({size for size, _, _ in groups})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False, sharex=True, sharey=True)
    for ax, size in zip(axes[0], sizes, strict=True):
        for i, series in enumerate(("before the study", "defaults now", "best swept")):
            points = []
            for kind in KINDS:
                mine = {r: g for (s, k, r), g in groups.items() if s == size and k == kind}
                g = mine.get(chosen(mine)[series]) if mine else None
                if g:
                    std = statistics.stdev(g["test"]) if len(g["test"]) > 1 else 0.0
                    points.append((g["params"], statistics.fmean(g["test"]), std, kind))
            if not points:
                continue
            xs, ys, err, kinds = zip(*points, strict=True)
            style = {"fmt": "s--", "mfc": "none"} if series == "best swept" else {"fmt": "o-"}
            ax.errorbar(xs, ys, yerr=err, color=f"C{i}", label=series, capsize=2, lw=1, alpha=0.85, **style)
            if series == "defaults now":
                for x, y, kind in zip(xs, ys, kinds, strict=True):
                    ax.annotate(kind, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xscale("log")
        ax.set_title(f"{size:,} training images", fontsize=10)
        ax.set_xlabel("parameters the kind adds (patch + head)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean over seeds)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the study's folder (every results.json under it)")
    parser.add_argument("--backbone", default="mobilenet_v2", help="whose runs (default: mobilenet_v2)")
    parser.add_argument("--csv", type=Path, help="also write one row per size, patch and recipe")
    parser.add_argument("--plot", type=Path, help="also draw the three recipes per size (PNG)")
    args = parser.parse_args()
    groups = gather(args.root, args.backbone)
    print(tables(groups))
    if args.csv:
        write_csv(groups, args.csv)
    if args.plot:
        plot(groups, args.plot)


if __name__ == "__main__":
    main()
