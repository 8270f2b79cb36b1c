"""What the memory savers cost in step time: the platform's step with the default ``lean_backward: auto``, with every
saver on (``true``), off (``false``, PyTorch's own layers) and a plain PyTorch step on the same model, per patch
kind, with 1 and 2 intra-op threads, all in one process.

*Plain PyTorch*: the same backbone and weights with the patch's parameters trainable in place (no per-task patch
tensors, no ``functional_call``), PyTorch's own layers, a ``Linear`` head, the same input preparation and layout.
Each round runs one step of every variant of one kind, order rotated; a ratio is each round's step over the same
round's step of the other variant, median over rounds.

    .venv/bin/python bench/saver_cost.py [--rounds 21] [--runs 2] [--thread-counts 1 2] [--layout NCHW]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from common import (
    CpuMonitor,
    add_common_args,
    finish,
    fmt_mb,
    machine_info,
    md_table,
    median,
    section_header,
    wait_for_quiet,
)
from step_time import Case
from torch import nn

from modelpatch.models.patches import resolve_patch
from modelpatch.training.weights import load_backbone

KINDS = ("full", "bn", "bias@frozen", "bias", "dw", "bn+dw", "logits")
VARIANTS = ("auto", "on", "off", "plain")
TARGET = 1.03  # issue 20: savers on within 3% of the step with PyTorch's layers and of a plain PyTorch step


class PlainCase(Case):
    """The same step in plain PyTorch: the backbone's own parameters train, its own layers, a Linear head."""

    def __init__(self, name: str, kind: str, size: int, device: str, channels_last: bool, *, width: float = 1.0,
                 batch: int = 128):  # fmt: skip
        torch.manual_seed(0)
        backbone = load_backbone(name, width=width)
        kind, _, stats = kind.partition("@")
        stats = stats or ("frozen" if kind == "logits" else "task")
        patch = resolve_patch(backbone, kind, norm_stats=stats, model_name=name)
        for pname, p in backbone.named_parameters():
            p.requires_grad_(pname in patch.params)
        norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.model = nn.Sequential(backbone, nn.Linear(backbone.num_features, 10)).to(device)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        for m in norms if stats == "frozen" else []:
            m.eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        self.images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
        self.labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
        self.mean = torch.full((1, 3, 1, 1), 0.5, device=device)
        self.device = device
        self.times: list[float] = []

    def step(self) -> torch.Tensor:
        """One step; its loss."""
        self.opt.zero_grad(set_to_none=True)
        x = (self.images.float().div_(255.0) - self.mean) / self.mean
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        loss = F.cross_entropy(self.model(x), self.labels)
        loss.backward()
        self.opt.step()
        return loss


def build(kind: str, channels_last: bool, device: str = "cpu", **size) -> dict[str, Case]:
    """The three variants of one patch kind (``size``: ``size``, ``width``, ``batch``; default 32, 1.0, 128)."""
    px = size.pop("size", 32)
    return {
        "auto": Case("mobilenet_v2", f"{kind}!auto", px, device, channels_last, **size),
        "on": Case("mobilenet_v2", kind, px, device, channels_last, **size),
        "off": Case("mobilenet_v2", f"{kind}!plain", px, device, channels_last, **size),
        "plain": PlainCase("mobilenet_v2", kind, px, device, channels_last, **size),
    }


def measure(cases: dict[str, Case], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {v: [] for v in cases}
    for r in range(rounds):
        order = list(cases)[r % len(cases) :] + list(cases)[: r % len(cases)]
        for v in order:
            times[v].append(cases[v].timed_step())
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return median(x / y for x, y in zip(times[a], times[b], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--runs", type=int, default=2, help="the whole measurement, repeated: each run's ratios")
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layout", choices=["channels-last", "NCHW"], default="channels-last")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    args = parser.parse_args()
    rounds, runs = (2, 1) if args.quick else (args.rounds, args.runs)
    channels_last = args.layout == "channels-last"
    load_note = wait_for_quiet(max_wait=args.max_wait)
    cases = {kind: build(kind, channels_last) for kind in args.kinds}
    saved = {}
    for kind, variants in cases.items():
        saved[kind] = {v: variants[v].memory()["saved"] for v in ("auto", "on", "off")}  # also a warm-up step each
        variants["plain"].step()
    results: dict[tuple[str, int], list[dict]] = {(k, t): [] for k in args.kinds for t in args.thread_counts}
    pairs = (("auto", "off"), ("auto", "plain"), ("on", "off"), ("on", "plain"), ("off", "plain"))
    with CpuMonitor() as monitor:
        for run in range(runs):
            for kind, variants in cases.items():
                for threads in args.thread_counts:
                    torch.set_num_threads(threads)
                    times = measure(variants, rounds)
                    result = {f"{a}/{b}": ratio(times, a, b) for a, b in pairs}
                    result["ms"] = {v: 1000 * median(times[v]) for v in VARIANTS}
                    results[kind, threads].append(result)
                    done = ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "ms")
                    print(f"[saver_cost] run {run + 1} {kind} {threads}t: {done}", file=sys.stderr, flush=True)
    rows, missed = [], []
    for (kind, threads), per_run in results.items():
        met = all(max(r["auto/off"], r["auto/plain"]) <= TARGET for r in per_run)
        if not met:
            missed.append(f"{kind} ({threads} thread{'s' * (threads > 1)})")

        def each(key: str, runs_: list[dict] = per_run) -> str:
            return ", ".join(f"{r[key]:.3f}" for r in runs_)

        rows.append(
            [f"`{kind}`", threads, *(f"{per_run[-1]['ms'][v]:,.0f}" for v in VARIANTS),
             *(each(f"{a}/{b}") for a, b in pairs), *(fmt_mb(saved[kind][v]) for v in ("auto", "on", "off")),
             "yes" if met else "**no**"]
        )  # fmt: skip
    header = ["patch", "threads", "auto ms", "true ms", "false ms", "plain ms", "auto / false", "auto / plain",
              "true / false", "true / plain", "false / plain", "saved MB auto", "saved MB true", "saved MB false",
              f"auto <= {TARGET}x both, every run?"]  # fmt: skip
    table = md_table(header, rows, align="lr" + "r" * 12 + "l")
    info = machine_info("cpu")
    intro = (
        f"mobilenet_v2 1.0, 32x32, batch 128, {args.layout}, random init, SGD momentum 0.9. {runs} run(s) of "
        f"{rounds} rounds, one step of each variant per round (order rotated); a ratio is the median of per-round "
        f"ratios, one value per run; *ms*: medians of the last run. *auto*: `lean_backward: auto` (the default: on "
        f"the CPU the ReLU savers only), *true*: every saver, *false*: PyTorch's own layers, *plain*: plain PyTorch "
        f"(the backbone's own parameters, no per-task patch tensors). *saved MB*: bytes autograd saves for "
        f"backward. Missed (the default over 3% in a run): {', '.join(missed) or 'none'}."
    )
    header_text = section_header("saver-cost", "What the memory savers cost", info, load_note, monitor)
    finish("saver-cost", "\n\n".join([header_text, intro, table]), args)


if __name__ == "__main__":
    main()
