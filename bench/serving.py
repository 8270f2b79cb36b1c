"""Serving K tasks: one mixed-task pass (``PatchModule.forward_mixed``) against one pass per task.

The model is built like ``tests/test_serving.py``'s ``tiny_model`` but at width 1.0: mobilenet_v2,
K=3 tasks (3, 5 and 4 classes), every task's patch and BatchNorm statistics perturbed so that the
tasks differ, eval mode, ``torch.no_grad()``. A batch of 256 uint8 32x32 images, each sample drawn
for a random task, is served (a) in one ``forward_mixed(images, tasks)`` call, (b) split by task
with one ``model(images_t, t)`` per task and the logits put back in batch order. Both layouts: channels-last
(the default of runs, so of the models they export) and NCHW.

    .venv/bin/python bench/serving.py [--quick] [--device cuda] [--layouts channels_last,nchw]
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

from modelpatch.models.patches import resolve_patch
from modelpatch.training.module import PatchModule, TaskInfo
from modelpatch.training.weights import load_backbone

TASKS = (("a", 3), ("b", 5), ("c", 4))
BATCH = 256
SIZE = 32
# (label, patch kind, norm_stats): the kinds of the issue, with tiny_model's default norm_stats
# ("task": every task owns its BatchNorm statistics), and logits with shared statistics.
CASES = (
    ("bn", "bn", "task"),
    ("dw", "dw", "task"),
    ("bias", "bias", "task"),
    ("bn+dw", "bn+dw", "task"),
    ("logits", "logits", "task"),
    ("logits, norm_stats=frozen", "logits", "frozen"),
    ("full", "full", "task"),  # no per-sample layer: one pass per task inside forward_mixed
)
LAYOUTS = {"channels_last": True, "nchw": False}


def build_model(kind: str, norm_stats: str, device: str, channels_last: bool = True) -> PatchModule:
    torch.manual_seed(0)
    backbone = load_backbone("mobilenet_v2", width=1.0)
    heads = [TaskInfo(n, k, [str(i) for i in range(k)], spec={"name": n, "input_size": SIZE}) for n, k in TASKS]
    patch = resolve_patch(backbone, kind, norm_stats=norm_stats)
    model = PatchModule(backbone, patch, heads, channels_last=channels_last)
    with torch.no_grad():  # make every task's patch and statistics differ (as tiny_model does)
        for name in model.task_names:
            for p in model.model.patches[name].parameters():
                p.add_(0.2 * torch.randn_like(p))
            for b in model.model.patches[name].buffers():
                if b.is_floating_point():
                    b.mul_(1 + 0.3 * torch.rand_like(b))
    return model.to(device).eval()


def per_task(model: PatchModule, images: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """One ``model(images_t, t)`` per task, logits scattered back into batch order."""
    order = list(dict.fromkeys(tasks))
    index = torch.tensor([order.index(t) for t in tasks], device=images.device)
    out = torch.full((len(tasks), max(model.tasks[t].num_classes for t in order)), float("-inf"), device=images.device)
    for i, task in enumerate(order):
        rows = (index == i).nonzero().squeeze(1)
        out[rows, : model.tasks[task].num_classes] = model(images[rows], task)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per way (default 5; --quick 1)")
    parser.add_argument("--layouts", default="channels_last,nchw", help="comma-separated: channels_last, nchw")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: unknown {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    device = check_device(args.device)
    apply_threads(args)
    rounds = args.rounds or (1 if args.quick else 5)
    info = machine_info(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen).to(device)
    names = [n for n, _ in TASKS]
    tasks = [names[i] for i in torch.randint(0, len(names), (BATCH,), generator=gen).tolist()]
    counts = {n: tasks.count(n) for n in names}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    load_note = wait_for_quiet(max_wait=args.max_wait)
    print(f"[serving] {load_note}", file=sys.stderr)
    rows, results = [], {}
    with CpuMonitor() as monitor, torch.no_grad():
        for layout, (label, kind, norm_stats) in ((ly, c) for ly in layouts for c in CASES):
            model = build_model(kind, norm_stats, device, channels_last=LAYOUTS[layout])
            label = f"{label} ({layout})"
            ways = {
                "mixed": lambda m=model: m.forward_mixed(images, tasks),
                "per_task": lambda m=model: per_task(m, images, tasks),
                "one_task": lambda m=model: m(images, "a"),
            }
            mixed, split = ways["mixed"](), ways["per_task"]()  # warm-up, and the check
            diff = (mixed - split)[torch.isfinite(split)].abs().max().item()
            same_inf = torch.equal(torch.isinf(mixed), torch.isinf(split))
            times: dict[str, list[float]] = {w: [] for w in ways}
            for r in range(rounds):
                for w in list(ways)[r % 3 :] + list(ways)[: r % 3]:
                    times[w].append(timed(ways[w]))
            med = {w: median(v) for w, v in times.items()}
            results[label] = med
            print(f"[serving] {label}: " + ", ".join(f"{w} {1000 * s:.0f} ms" for w, s in med.items()), file=sys.stderr)
            rows.append(
                [
                    f"`{kind}`" + (" (`norm_stats=frozen`)" if norm_stats == "frozen" else ""),
                    layout,
                    f"{BATCH / med['mixed']:,.0f}",
                    f"{BATCH / med['per_task']:,.0f}",
                    f"{med['per_task'] / med['mixed']:.2f}x",
                    f"{BATCH / med['one_task']:,.0f}",
                    f"{1000 * med['mixed']:,.0f} / {1000 * med['per_task']:,.0f}",
                    f"{diff:.1e}" + ("" if same_inf else " (padding differs!)"),
                ]
            )
            del model
    tab = md_table(
        [
            "patch",
            "layout",
            "mixed images/s (`forward_mixed`)",
            "per-task images/s (K passes)",
            "mixed / per-task throughput",
            "one task, whole batch images/s (reference)",
            "ms mixed / per-task",
            "max abs logit diff",
        ],
        rows,
    )
    intro = (
        f"mobilenet_v2 1.0, K={len(TASKS)} tasks ({', '.join(f'{n}: {k} classes' for n, k in TASKS)}), built like "
        f"`tests/test_serving.py:tiny_model` (random init, every task's patch and statistics perturbed; "
        f"`resolve_patch` default `norm_stats=task`, plus one `logits` row with shared, frozen statistics), eval "
        f"mode, `torch.no_grad()`, in each layout: channels-last (`PatchModule(channels_last=True)`, the default "
        f"of runs and so of the models they export) and NCHW. `full` has no per-sample layer: `forward_mixed` "
        f"runs one pass per task for it. Batch {BATCH} of uint8 [3, {SIZE}, {SIZE}] images, tasks drawn at random "
        f"({', '.join(f'{n}: {c}' for n, c in counts.items())} samples). *Mixed*: one "
        f"`model.forward_mixed(images, tasks)`. *Per-task*: the batch split by task, one `model(images_t, t)` "
        f"per task, logits scattered back (the same [N, max classes] output, `-inf` padded). *Reference*: the "
        f"whole batch through one task's model, `model(images, 'a')` (a plain backbone pass: the speed a "
        f"single-task server gets). Median of {rounds} interleaved calls after one warm-up call each."
    )
    header = section_header("serving", "Serving K tasks: mixed-task batch vs one pass per task", info, load_note,
                            monitor)  # fmt: skip
    content = "\n\n".join([header, intro, tab])
    speed = {label: med["per_task"] / med["mixed"] for label, med in results.items()}
    target = (
        "none (report): mixed-task batch vs one pass per task, K=3, batch 256",
        "mixed / per-task throughput: "
        + ", ".join(f"{label} {s:.2f}x" for label, s in speed.items() if "frozen" not in label),
        None,
    )
    finish("serving", content, args, target)


if __name__ == "__main__":
    main()
