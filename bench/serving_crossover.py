"""Mixed-task serving: where the one-pass twin beats one pass per task (``forward_by_task``), by the number of
tasks K and the batch, so by samples per task (mobilenet_v2 1.0, channels-last, 32x32, eval, no grad, 2 threads,
medians of 5 calls; tasks drawn at random per sample). Prints one line per case. ``forward_mixed`` takes the
twin below ``multitask_forward.BY_TASK_FROM`` samples per task; here the twin is forced (the threshold set past
any batch) to time it on both sides of the threshold.

    .venv/bin/python bench/serving_crossover.py
"""

from __future__ import annotations

import statistics
import time

import serving
import torch

from modelpatch.models import multitask_forward
from modelpatch.models.multitask_forward import forward_by_task, forward_mixed

CASES = ((2, 256), (3, 256), (4, 256), (6, 256), (8, 256), (16, 256), (32, 64), (64, 64))  # (K tasks, batch)


def timed(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    multitask_forward.BY_TASK_FROM = 1 << 30  # always the twin
    for k, batch in CASES:
        serving.TASKS = tuple((f"t{i}", 4) for i in range(k))
        names = [n for n, _ in serving.TASKS]
        for kind in ("bn", "bn+dw"):
            backbone = serving.build_model(kind, "task", "cpu", channels_last=True).model
            gen = torch.Generator().manual_seed(0)
            images = torch.rand(batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
            task_index = torch.randint(0, k, (batch,), generator=gen)
            call = (backbone, images, task_index, names)
            with torch.no_grad():
                twin = timed(lambda c=call: forward_mixed(*c))
                by_task = timed(lambda c=call: forward_by_task(*c))
            print(
                f"K={k:3d} batch={batch:4d} ({batch / k:5.1f} per task) {kind:6s} twin {twin * 1e3:7.1f} ms  "
                f"by-task {by_task * 1e3:7.1f} ms  "
                f"twin / by-task throughput {by_task / twin:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
