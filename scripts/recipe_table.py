"""The recipe study's tables (docs/results.md#recipes): per training size and patch kind, the defaults before
the study, the defaults now, and the best recipe swept, each as the mean test accuracy over its seeds.

    python scripts/recipe_table.py runs/study [--csv runs/study/recipes.csv]

A recipe is what a run trained with, read from its resolved ``config.yaml``: optimizer, the patch's and the
head's rate, ``trainer.min_steps`` and ``trainer.max_epochs``. Runs of one recipe that differ in their seed are
averaged. "best" is the recipe with the highest mean validation accuracy (the test split chooses nothing);
runs with ``optim.lr=auto`` have a column of their own (one recipe per seed: the finder's rate).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("logits", "bias", "bn", "dw", "bn+dw", "full")
OLD = ("sgd", 0.1, 0.05, 0, 8)  # before the study: 8 epochs whatever the size, patch 0.1, head 0.05


def recipe(config: dict, result: dict) -> tuple:
    """(optimizer, patch rate, head rate, min_steps, max_epochs) of a resolved run config; under
    ``optim.lr=auto`` the optimizer reads "<name> auto" and the rates are the finder's (results.json)."""
    optim, trainer = config["optim"], config["trainer"]
    if optim["lr"] == "auto":
        found = float(result["lr_find"]["lr"])
        return f"{optim['name']} auto", found, found, int(trainer.get("min_steps") or 0), trainer["max_epochs"]
    patch_lr = optim["patch_lr"] if optim["patch_lr"] is not None else optim["lr"]
    head_lr = optim["head_lr"] if optim["head_lr"] is not None else optim["lr"]
    return optim["name"], float(patch_lr), float(head_lr), int(trainer.get("min_steps") or 0), trainer["max_epochs"]


def default_recipe(kind: str) -> tuple:
    """The recipe ``python train.py experiment=transfer_fmnist_b patch=<kind>`` trains with (SGD)."""
    train = yaml.safe_load((ROOT / "conf" / "train.yaml").read_text())
    patch = yaml.safe_load((ROOT / "conf" / "patch" / f"{kind}.yaml").read_text())
    trainer = yaml.safe_load((ROOT / "conf" / "trainer" / "default.yaml").read_text())
    lr = train["optim"]["lr"]
    patch_lr, head_lr = patch.get("lr", lr) or lr, patch.get("head_lr", lr) or lr
    return "sgd", float(patch_lr), float(head_lr), int(trainer["min_steps"]), 8


def describe(r: tuple) -> str:
    name, patch_lr, head_lr, min_steps, epochs = r
    rates = f"{patch_lr:g}" if patch_lr == head_lr else f"{patch_lr:g}/{head_lr:g}"
    budget = f"{epochs} ep" + (f", >= {min_steps} steps" if min_steps else "")
    return f"{name} {rates}, {budget}"


def gather(root: Path) -> dict[tuple, dict]:
    """(size, kind, recipe) -> test and validation accuracies, seeds and steps of its runs."""
    groups: dict[tuple, dict] = defaultdict(lambda: {"test": [], "val": [], "seeds": [], "runs": []})
    for path in sorted(root.rglob("results.json")):
        config_path = path.parent / "config.yaml"
        if not config_path.exists():
            continue
        config = yaml.safe_load(config_path.read_text())
        result = json.loads(path.read_text())
        if result["patch"] not in KINDS or config["task"].get("name") != "fmnist_b":
            continue
        key = (config["task"]["train_size"], result["patch"], recipe(config, result))
        g = groups[key]
        g["test"].append(result["test_acc"])
        g["val"].append(result["val_acc"])
        g["seeds"].append(result["seed"])
        g["runs"].append(str(path.parent.relative_to(root)))
    return groups


def cell(g: dict | None) -> str:
    if not g:
        return "not run"
    mean = statistics.fmean(g["test"])
    if len(g["test"]) == 1:
        return f"{mean:.4f} (1 seed)"
    return f"{mean:.4f} ± {statistics.stdev(g['test']):.4f} ({len(g['test'])})"


def tables(groups: dict[tuple, dict]) -> str:
    sizes = sorted({size for size, _, _ in groups})
    out = []
    for size in sizes:
        out += [
            f"**{size:,} training images**",
            "",
            "| patch | before the study | defaults now | best swept (by val acc) | its recipe | swept | lr=auto |",
            "|---|---|---|---|---|---|---|",
        ]
        for kind in KINDS:
            mine = {r: g for (s, k, r), g in groups.items() if s == size and k == kind}
            if not mine:
                continue
            auto = [r for r in mine if r[0].endswith(" auto")]
            swept = [r for r in mine if r not in auto]
            best = max(swept, key=lambda r: statistics.fmean(mine[r]["val"]))
            new = default_recipe(kind)
            found = "; ".join(f"{cell(mine[r])} at {r[1]:.2g}" for r in auto) or "not run"
            row = [
                kind,
                cell(mine.get(OLD)),
                cell(mine.get(new)),
                cell(mine[best]),
                describe(best),
                str(len(swept)),
                found,
            ]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def write_csv(groups: dict[tuple, dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["train_size", "patch", "optim", "patch_lr", "head_lr", "min_steps", "max_epochs",
                         "test_acc", "val_acc", "n", "seeds", "runs"])  # fmt: skip
        for (size, kind, r), g in sorted(groups.items(), key=lambda item: (item[0][0], KINDS.index(item[0][1]))):
            test, val = round(statistics.fmean(g["test"]), 4), round(statistics.fmean(g["val"]), 4)
            writer.writerow(
                [size, kind, *r, test, val, len(g["test"]), " ".join(map(str, g["seeds"])), " ".join(g["runs"])]
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the study's folder (every results.json under it)")
    parser.add_argument("--csv", type=Path, help="also write one row per size, patch and recipe")
    args = parser.parse_args()
    groups = gather(args.root)
    print(tables(groups))
    if args.csv:
        write_csv(groups, args.csv)


if __name__ == "__main__":
    main()
