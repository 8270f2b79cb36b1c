"""Two runs side by side: each ``results.json``'s accuracies and wall time, and the largest absolute difference
between their ``checkpoints/last.ckpt`` tensors (``python bench/compare_runs.py <run dir> <run dir>``; used by
``bench/multinode_cpu.sh`` for docs/clusters.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(a: str, b: str) -> None:
    results = {d: json.loads((Path(d) / "results.json").read_text()) for d in (a, b)}
    states = {
        d: torch.load(Path(d) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        for d in (a, b)
    }
    sa, sb = states[a], states[b]
    diff = max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())
    for d, r in results.items():
        tasks = " | ".join(f"{t} test {v['test_acc']:.4f} val {v['val_acc']:.4f}" for t, v in r["tasks"].items())
        print(f"{d}: test_acc {r['test_acc']:.4f} | {tasks} | {r['wall_time_s']} s")
    print(f"max |weight difference| {diff:.3g}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
