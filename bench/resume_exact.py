"""Exact resumption, measured on the miniature transfer study (docs/clusters.md, "Preemption and faults"):
``patch=bn`` on 1,000 images of Fashion-MNIST 5-9 from the make-main source, 4 epochs, run uninterrupted twice,
then killed (SIGKILL) and restarted in the same folder until it finishes, at the points of each chain below.
Prints one markdown table: accuracies and digests of the final weights (last.ckpt), the optimizer state, the
exported patch, and whether metrics.csv has the uninterrupted run's rows.

    .venv/bin/python bench/resume_exact.py [--source runs/main/pretrain/checkpoints/last.ckpt] [--out runs/resume]

Without ``--source`` (or when it is missing) the source is pretrained first, as ``make main`` does.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import run_killed, run_state  # noqa: E402  (the fault tests' own killer and digests)

QUIET = ["extras.print_config=false"]


def chains(s: int) -> dict[str, list[tuple[str, int]]]:
    """Kill points (``tests.kill.KillAt``: at, after N steps), ``s`` steps an epoch; epochs counted from 1 here."""
    return {
        "uninterrupted (again)": [],
        "killed just after epoch 2 (the issue's)": [("epoch_start", 2)],
        "killed mid-epoch 2, in epoch 2's validation, writing last.ckpt after epoch 3, when epoch 4 starts": [
            ("step", s + s // 2),
            ("validation", 2 * s),
            ("checkpoint_write", 3 * s),
            ("epoch_start", 3),
        ],
        "killed when epoch 4 starts, then last.ckpt cut in half": [("epoch_start", 3)],
    }


def cut_last_in_half(folder: Path):
    def cut(restart: int) -> None:
        last = folder / "checkpoints" / "last.ckpt"
        with open(last, "r+b") as f:
            f.truncate(last.stat().st_size // 2)

    return cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="runs/main/pretrain/checkpoints/last.ckpt")
    parser.add_argument("--out", default="runs/resume")
    args = parser.parse_args()
    out, source = Path(args.out).resolve(), Path(args.source).resolve()
    if not source.is_file():
        pretrain = out / "pretrain"
        run([sys.executable, "train.py", "experiment=pretrain_fmnist_a", f"hydra.run.dir={pretrain}", *QUIET])
        source = pretrain / "checkpoints" / "last.ckpt"
    transfer = [
        "patch=bn", f"backbone.weights={source}", "task.train_size=1000",
        "trainer.max_epochs=4", *QUIET,
    ]  # fmt: skip
    start = time.time()
    reference = out / "uninterrupted"
    shutil.rmtree(reference, ignore_errors=True)
    run([sys.executable, "train.py", *transfer, f"hydra.run.dir={reference}"])
    expected = run_state(reference)
    steps_per_epoch = expected["last"]["global_step"] // 4
    rows, said = [row("uninterrupted", [], expected, expected)], []
    for i, (name, kills) in enumerate(chains(steps_per_epoch).items()):
        folder = out / f"chain{i}"
        shutil.rmtree(folder, ignore_errors=True)
        cut = cut_last_in_half(folder) if "cut in half" in name else None
        logs = run_killed(folder, transfer, kills, before_restart=cut, cwd=ROOT)
        rows.append(row(name, kills, run_state(folder), expected))
        if cut:
            said += [line for line in logs[-1].splitlines() if "cannot resume" in line or "instead" in line]
    print(f"\nsource {source}; {steps_per_epoch} steps an epoch; {time.time() - start:.0f} s\n")
    kills = "kill points (`tests/kill.py`: point, steps or epochs before it)"
    print(f"| run | {kills} | test acc | val acc | weights | optimizer | patch | metrics.csv |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nthe last start after last.ckpt was cut in half logged:\n" + "\n".join(said))


def row(name: str, kills: list, state: dict, expected: dict) -> str:
    (val, test), patch = state["accuracies"]["fmnist_b"], next(iter(state["patches"].values()))
    same_rows = "same rows" if state["metrics"] == expected["metrics"] else "DIFFERENT"
    points = ", ".join(f"{at} {n}" for at, n in kills) or "-"
    digests = f"{state['last']['weights']} | {state['last']['optimizer']} | {patch}"
    return f"| {name} | {points} | {test:.4f} | {val:.4f} | {digests} | {same_rows} |"


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)


if __name__ == "__main__":
    main()
