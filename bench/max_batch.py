"""The largest training batch that fits a memory budget, per patch, with and without lean_backward, and with the
ReLU masks at 1 byte (before issue 20) or 1 bit per element (now).

Each point is a fresh process (``--child``) that builds the model as bench/step_time.py does and
runs two training steps at one batch size, then reports its peak resident memory (CPU: the
process's peak RSS, ``ru_maxrss``, imports and all) or ``torch.cuda.max_memory_allocated`` (CUDA).
The parent searches the batch size: doubling, then bisecting to within ``--resolution``.

    .venv/bin/python bench/max_batch.py [--quick] [--budget-mb 2048] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import (
    CpuMonitor,
    add_common_args,
    apply_threads,
    check_device,
    finish,
    machine_info,
    md_table,
    section_header,
    wait_for_quiet,
)

NAME, SIZE = "mobilenet_v2", 32
# (patch, lean_backward, masks packed at 1 bit): the patches of the memory table; `full` keeps every input either way.
POINTS = [("full", True, True)]
POINTS += [(kind, lean, packed) for kind in ("bn", "bias@frozen", "dw") for lean, packed in
           ((False, True), (True, False), (True, True))]  # fmt: skip
START = 64


def label(kind: str) -> str:
    kind, _, stats = kind.partition("@")
    return f"`{kind}`" + (f" (`norm_stats={stats}`)" if stats else "")


def child(kind: str, batch: int, device: str, lean: bool, threads: int | None, packed: bool = True) -> None:
    """Two training steps at ``batch``; print the peak memory in bytes as JSON."""
    import torch
    from step_time import Case

    from modelpatch.models import memory

    memory.PACK_MASKS = packed
    if threads:
        torch.set_num_threads(threads)
    case = Case(NAME, kind if lean else f"{kind}!plain", SIZE, device, batch=batch)
    case.step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    case.step()
    case.sync()
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    print(json.dumps({"peak": peak}))


def peak_of(kind: str, batch: int, lean: bool, packed: bool, args: argparse.Namespace) -> int:
    cmd = [sys.executable, __file__, "--child", kind, str(batch), "--device", args.device]
    cmd += ["--no-lean"] if not lean else []
    cmd += ["--byte-masks"] if not packed else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout
    peak = json.loads(out.strip().splitlines()[-1])["peak"]
    print(f"[max_batch] {kind} lean={lean} batch {batch}: peak {peak / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
    return peak


def largest_batch(
    kind: str, lean: bool, packed: bool, budget: int, resolution: float, args: argparse.Namespace
) -> dict:
    """Largest batch (a multiple of 8) whose peak fits ``budget``, within ``resolution``."""
    peaks: dict[int, int] = {}

    def peak(batch: int) -> int:
        if batch not in peaks:
            peaks[batch] = peak_of(kind, batch, lean, packed, args)
        return peaks[batch]

    lo, hi = 0, START
    while peak(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > max(8, resolution * lo):
        mid = (lo + hi) // 2 // 8 * 8
        if peak(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return {"kind": kind, "lean": lean, "packed": packed, "batch": lo, "fail": hi, "peak": peaks.get(lo),
            "points": len(peaks)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--budget-mb", type=float, default=2048, help="memory budget in MiB (default 2048)")
    parser.add_argument("--resolution", type=float, default=0.1, help="bisect until (fail - fit) <= this x fit")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--no-lean", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--byte-masks", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.device, not args.no_lean, args.threads, not args.byte_masks)
        return
    device = check_device(args.device)
    apply_threads(args)
    info = machine_info(device)
    load_note = wait_for_quiet(max_wait=args.max_wait)
    budget = int(args.budget_mb * 2**20)
    points = POINTS[:3] if args.quick else POINTS
    resolution = 0.5 if args.quick else args.resolution
    start = time.monotonic()
    with CpuMonitor() as monitor:
        results = [largest_batch(*point, budget, resolution, args) for point in points]
    full = next(r["batch"] for r in results if r["kind"] == "full")
    rows = [
        [
            label(r["kind"]),
            "true" if r["lean"] else "false",
            ("1 bit (default)" if r["packed"] else "1 byte (before issue 20)") if r["lean"] else "",
            f"{r['batch']:,}",
            f"{r['fail']:,}",
            f"{r['batch'] / full:.1f}x",
            f"{r['peak'] / 2**20:,.0f}" if r["peak"] else "",
            str(r["points"]),
        ]
        for r in results
    ]
    what = "peak RSS" if device == "cpu" else "CUDA max_memory_allocated"
    header = ["patch", "`lean_backward`", "ReLU masks", "largest batch that fits", "smallest that did not", "x full"]
    table = md_table([*header, f"{what} at that batch MiB", "processes"], rows, align="lllrrrrr")
    intro = (
        f"`{NAME}` (width 1.0), {SIZE}x{SIZE}, channels-last, model and step as in [step-time](#step-time) "
        f"(forward, cross-entropy, backward, SGD with momentum). Budget: **{args.budget_mb:,.0f} MiB of {what}** "
        f"of a fresh process per point (imports, model, data, two steps). Batch sizes doubled from {START}, then "
        f"bisected (multiples of 8) to within {resolution:.0%}; {time.monotonic() - start:.0f} s in all."
    )
    header_text = section_header("max-batch", "Largest batch in a memory budget", info, load_note, monitor)
    finish("max-batch", "\n\n".join([header_text, intro, table]), args)


if __name__ == "__main__":
    main()
