"""What ``compile: true`` (torch.compile of the patched backbone, inductor) does to a training step.

Per patch kind, two models built as the platform builds them (``step_time.Case``: mobilenet_v2 1.0,
32x32, batch 128, channels-last), one compiled with ``modelpatch.training.compiling.compile_backbone``: the
compiled model's first steps (where compiling happens) are timed alone, then steps of both models
are timed interleaved and the medians reported.

    .venv/bin/python bench/compile_time.py [--quick] [--device cuda] [--kinds bn full]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import (
    CpuMonitor,
    add_common_args,
    apply_threads,
    check_device,
    finish,
    machine_info,
    md_table,
    median,
    section_header,
    wait_for_quiet,
)
from step_time import BATCH, Case

from modelpatch.training.compiling import compile_backbone

NAME, SIZE = "mobilenet_v2", 32


def measure(kind: str, device: str, rounds: int, backend: str) -> dict:
    eager = Case(NAME, kind, SIZE, device)
    compiled = Case(NAME, kind, SIZE, device)
    compile_backbone(compiled.model, backend)
    eager.timed_step()  # warm-up
    first = [compiled.timed_step() for _ in range(3)]  # compiles (forward and backward graphs) on the first
    for r in range(rounds):
        pair = (eager, compiled) if r % 2 == 0 else (compiled, eager)
        for case in pair:
            case.times.append(case.timed_step())
        print(
            f"[compile] {kind} round {r + 1}/{rounds}: eager {1000 * median(eager.times):.0f} ms, "
            f"compiled {1000 * median(compiled.times):.0f} ms",
            file=sys.stderr,
            flush=True,
        )
    return {
        "kind": kind,
        "first": first,
        "eager": eager.times,
        "compiled": compiled.times,
        "speedup": median(e / c for e, c in zip(eager.times, compiled.times, strict=True)),
    }


def table(results: list[dict]) -> str:
    header = [
        "patch",
        "first 3 compiled steps, s (compiling)",
        "eager step ms median (min-max)",
        "compiled step ms median (min-max)",
        "eager / compiled (median of pairs)",
    ]
    rows = []
    for r in results:
        e, c = r["eager"], r["compiled"]
        rows.append(
            [
                f"`{r['kind']}`",
                ", ".join(f"{t:.1f}" for t in r["first"]),
                f"{1000 * median(e):,.0f} ({1000 * min(e):,.0f}-{1000 * max(e):,.0f})",
                f"{1000 * median(c):,.0f} ({1000 * min(c):,.0f}-{1000 * max(c):,.0f})",
                f"{r['speedup']:.2f}",
            ]
        )
    return md_table(header, rows, align="lrrrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--kinds", nargs="*", default=["bn", "full"], help="patch kinds (default: bn full)")
    parser.add_argument("--rounds", type=int, default=None, help="timed pairs of steps (default 8; --quick 2)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    args = parser.parse_args()
    device = check_device(args.device)
    apply_threads(args)
    info = machine_info(device)
    load_note = wait_for_quiet(max_wait=args.max_wait)
    rounds = args.rounds or (2 if args.quick else 8)
    start = time.monotonic()
    with CpuMonitor() as monitor:
        results = [measure(kind, device, rounds, args.backend) for kind in args.kinds]
    header = section_header(
        "compile", f"torch.compile of the backbone (`compile: true`), {device}", info, load_note, monitor
    )
    intro = (
        f"`{NAME}` (width 1.0), {SIZE}x{SIZE}, batch {BATCH}, channels-last, one step = forward + cross-entropy + "
        f"backward + SGD step (`bench/step_time.py`'s `Case`), backend `{args.backend}`, torch {torch.__version__}. "
        f"Per kind an eager and a compiled model: the compiled model's first 3 steps are timed alone (the first "
        f"compiles the forward and backward graphs), then {rounds} pairs of steps, one of each model, alternating "
        f"which goes first. *eager / compiled*: each pair's eager step over its compiled step, median over pairs "
        f"(above 1: compiled is faster). Whole measurement {time.monotonic() - start:.0f}s."
    )
    finish("compile", "\n\n".join([header, intro, table(results)]), args)


if __name__ == "__main__":
    main()
