"""Mixed-task serving: where the one-pass twin (``forward_mixed``) beats one pass per task (``forward_by_task``),
by the number of tasks K and the batch (mobilenet_v2 1.0, channels-last, 32x32, eval, no grad, 2 threads,
medians of 5 calls; tasks drawn at random per sample). Prints one line per case.

    .venv/bin/python bench/serving_crossover.py
"""

from __future__ import annotations

import statistics
import time

import serving
import torch

from modelpatch.models.multitask_forward import forward_by_task, forward_mixed

CASES = ((3, 256), (16, 256), (32, 64), (64, 64))  # (K tasks, batch)


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
                f"K={k:3d} batch={batch:4d} {kind:6s} twin {twin * 1e3:7.1f} ms  by-task {by_task * 1e3:7.1f} ms  "
                f"twin / by-task throughput {by_task / twin:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
