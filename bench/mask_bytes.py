"""ReLU masks at 1 bit against 1 byte per element: bytes saved for backward and step time per patch kind, both
in one process, interleaved (mobilenet_v2 1.0, 32x32, batch 128, channels-last and NCHW).

    .venv/bin/python bench/mask_bytes.py [--threads 2] [--rounds 7]

Prints one markdown table; the step-time ratio is each round's packed step over the same round's byte-mask step,
median over rounds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_time import Case  # the step and memory measurement of docs/benchmarks.md

from modelpatch.models import memory

KINDS = ("full", "bn", "bias@frozen", "dw", "bn+dw")


def with_masks(packed: bool, fn):
    memory.PACK_MASKS = packed
    try:
        return fn()
    finally:
        memory.PACK_MASKS = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for channels_last in (True, False):
        for kind in KINDS:
            case = Case("mobilenet_v2", kind, 32, "cpu", channels_last)
            case.step()  # warm-up: optimizer state, allocator
            saved = {p: with_masks(p, case.memory)["saved"] for p in (False, True)}
            ratios = []
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                times = {p: with_masks(p, case.timed_step) for p in order}
                ratios.append(times[True] / times[False])
            layout = "channels-last" if channels_last else "NCHW"
            rows.append(
                f"| {kind} | {layout} | {saved[False] / 1e6:.1f} | {saved[True] / 1e6:.1f} | "
                f"{(saved[False] - saved[True]) / 1e6:.1f} | {statistics.median(ratios):.3f} |"
            )
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds\n")
    print("| patch | layout | saved MB, 1-byte masks | saved MB, 1-bit masks | less | step time, bit / byte |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
