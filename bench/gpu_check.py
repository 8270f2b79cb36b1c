"""The GPU check: everything that must hold on a CUDA device, in one table, in under 8 minutes on one GPU.

Checks (each row says what it compared and whether it held; any mismatch exits 1):

- ``step``: step time and peak CUDA memory per patch kind and setting (fp32 NCHW, fp32 channels-last,
  bf16-mixed, ``lean_backward``, ``compile``); the first step's loss of each setting must equal fp32 NCHW's
  on the same weights and batch (bf16 within 10%, the others within 0.1%).
- ``savers``: per patch kind, step time and peak CUDA memory with ``lean_backward`` auto (the default), true (every
  saver) and false, and in plain PyTorch (``bench/saver_cost.py``'s variants, interleaved); more savers must not
  raise the first step's peak (above what was allocated before it), and the first losses must agree.
- ``forward_mixed``: one pass over a batch mixing 3 tasks equals the per-task passes.
- ``cache``: features cached on the device (``data.cache_features=true``) equal those cached on the CPU.
- ``ddp``: ``train.py trainer=ddp trainer.devices=1`` runs and writes ``results.json``.
- ``pool``: ``train.py -m hydra/launcher=pool`` runs two jobs, both on the GPU(s), with results.

    bash bench/gpu_check.sh                                # on the GPU machine (= --device cuda)
    .venv/bin/python bench/gpu_check.py --device cpu --quick   # smoke run here, no GPU
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import FASHION_MNIST, ROOT, check_device, machine_info, machine_line, md_table, median
from step_time import Case

from modelpatch.training.compiling import compile_backbone

CHECKS = ("step", "savers", "forward_mixed", "cache", "ddp", "pool")
# (label, channels_last, lean_backward, bf16, compile)
SETTINGS = (
    ("fp32 NCHW", False, False, False, False),
    ("fp32 channels-last", True, False, False, False),
    ("bf16-mixed", True, False, True, False),
    ("lean_backward", True, True, False, False),
    ("compile", True, False, False, True),
)
# bf16 keeps 8 bits of mantissa: at random init, through mobilenet_v2's ~50 layers, the first loss moved 3.1%
# on CPU (bench/gpu_check.py --device cpu --quick); a wrong path (NaN, no autocast, other weights) moves it more.
LOSS_RTOL = {"bf16-mixed": 0.1}
DEFAULT_RTOL = 1e-3


class Report:
    """Rows of the one table, and whether every check held."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.failed: list[str] = []

    def add(self, check: str, what: str, result: str, ok: bool) -> None:
        self.rows.append([check, what, result, "ok" if ok else "**MISMATCH**"])
        print(f"[gpu_check] {check} | {what} | {result} | {'ok' if ok else 'MISMATCH'}", file=sys.stderr, flush=True)
        if not ok:
            self.failed.append(f"{check}: {what}: {result}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def one_step(case: Case, bf16: bool) -> float:
    case.opt.zero_grad(set_to_none=True)
    with torch.autocast(case.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(case.model(case.images, "t"), case.labels)
    loss.backward()
    case.opt.step()
    return float(loss)


def check_step(report: Report, args: argparse.Namespace) -> None:
    device, cuda = args.device, args.device.startswith("cuda")
    backend = args.compile_backend or ("inductor" if cuda or not args.quick else "eager")
    for kind in args.kinds:
        reference = None
        for label, channels_last, lean, bf16, compiled in SETTINGS:
            if compiled and kind not in args.compile_kinds:
                continue
            kind_arg = kind + ("" if lean else "!plain")  # no suffix: lean_backward=true (every saver)
            case = Case("mobilenet_v2", kind_arg, args.size, device, channels_last, width=args.width, batch=args.batch)
            if compiled:
                compile_backbone(case.model, backend)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            loss = one_step(case, bf16)  # compiles, for the compile setting
            sync(device)
            first = time.perf_counter() - start
            times = []
            for _ in range(args.steps):
                sync(device)
                start = time.perf_counter()
                one_step(case, bf16)
                sync(device)
                times.append(time.perf_counter() - start)
            peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MB" if cuda else ""
            reference = loss if reference is None else reference
            rtol = LOSS_RTOL.get(label, DEFAULT_RTOL)
            ok = math.isfinite(loss) and abs(loss - reference) <= rtol * abs(reference)
            what = f"`{kind}`, {label}" + (f" ({backend})" if compiled else "")
            result = (
                f"{1000 * median(times):,.1f} ms/step{peak}; first step {first:.1f}s; "
                f"loss {loss:.5f} vs fp32 {reference:.5f} (rtol {rtol:g})"
            )
            report.add("step", what, result, ok)
            del case


def check_savers(report: Report, args: argparse.Namespace) -> None:
    import saver_cost

    device, cuda = args.device, args.device.startswith("cuda")
    for kind in args.saver_kinds:
        cases = saver_cost.build(kind, True, device, size=args.size, width=args.width, batch=args.batch)
        peaks, losses = {}, {}
        for variant, case in cases.items():
            base = 0
            if cuda:  # the step's own peak: above what is allocated before it (every variant's model, ...)
                sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(2)  # the same dropout draws in each variant's first step
            losses[variant] = one_step(case, False) if variant != "plain" else float(case.step())
            sync(device)
            peaks[variant] = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else float("nan")
        times = saver_cost.measure(cases, args.steps)
        ms = {v: 1000 * median(t) for v, t in times.items()}
        agree = all(abs(loss - losses["off"]) <= DEFAULT_RTOL * abs(losses["off"]) for loss in losses.values())
        ok = agree and (not cuda or peaks["on"] <= peaks["auto"] <= peaks["off"])
        result = (
            f"ms/step auto {ms['auto']:,.1f} / on {ms['on']:,.1f} / off {ms['off']:,.1f} / plain {ms['plain']:,.1f} "
            f"(auto/off {saver_cost.ratio(times, 'auto', 'off'):.3f}, "
            f"on/off {saver_cost.ratio(times, 'on', 'off'):.3f}, "
            f"on/plain {saver_cost.ratio(times, 'on', 'plain'):.3f}); "
            f"first step's peak above its start MB auto {peaks['auto']:,.0f} / on {peaks['on']:,.0f} / "
            f"off {peaks['off']:,.0f} / plain {peaks['plain']:,.0f}; "
            f"first losses {', '.join(f'{v} {loss:.5f}' for v, loss in losses.items())}"
        )
        report.add("savers", f"`{kind}`, channels-last", result, ok)
        del cases


def check_forward_mixed(report: Report, args: argparse.Namespace) -> None:
    from modelpatch.models.patches import resolve_patch
    from modelpatch.training.module import PatchModule, TaskInfo
    from modelpatch.training.weights import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone("mobilenet_v2", width=args.width)
    patch = resolve_patch(backbone, "bn+dw", norm_stats="task", model_name="mobilenet_v2")
    tasks = [TaskInfo("a", 10), TaskInfo("b", 5), TaskInfo("c", 3)]
    model = PatchModule(backbone, patch, tasks, channels_last=True).to(args.device).eval()
    with torch.no_grad():
        for p in model.model.patches.parameters():  # each task's patch different from the others'
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (24, 3, args.size, args.size), dtype=torch.uint8, generator=gen).to(args.device)
    names = [("a", "b", "c")[i % 3] for i in range(24)]
    with torch.no_grad():
        mixed = model.forward_mixed(images, names)
        worst = 0.0
        for i, task in enumerate(names):
            single = model(images[i : i + 1], task)[0]
            n = tasks[("a", "b", "c").index(task)].num_classes
            worst = max(worst, float((mixed[i, :n] - single).abs().max() / single.abs().max().clamp_min(1e-6)))
    report.add("forward_mixed", "3 tasks (bn+dw), 24 samples", f"max relative difference {worst:.2e}", worst < 1e-4)


def check_cache(report: Report, args: argparse.Namespace) -> None:
    from modelpatch.config import compose_run_config
    from modelpatch.run import build

    cuda = args.device.startswith("cuda")
    features = {}
    with tempfile.TemporaryDirectory() as tmp:
        for accelerator in ("cpu", "gpu") if cuda else ("cpu", "auto"):
            overrides = [
                f"backbone.width={args.width}",
                "patch=logits",
                "task=digits",
                "data.cache_features=true",
                "data.num_workers=0",
                f"trainer.accelerator={accelerator}",
                f"data.fashion_mnist_dir={FASHION_MNIST}",
            ]
            cfg = compose_run_config(overrides, Path(tmp) / accelerator, Path(tmp) / "data")
            torch.manual_seed(0)  # the same random backbone both times
            start = time.perf_counter()
            datamodule, _ = build(cfg)
            features[accelerator] = (datamodule.data["digits"].test.images, time.perf_counter() - start)
    (ref, t_ref), (got, t_got) = features.values()
    diff = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
    where = "cuda" if cuda else "cpu (accelerator=auto)"
    result = (
        f"max relative difference {diff:.2e} over {tuple(got.shape)}; build with caching {t_got:.1f}s vs {t_ref:.1f}s"
    )
    report.add("cache", f"digits features cached on {where} vs cpu", result, diff < 1e-4 and got.shape == ref.shape)


def train_py(args: argparse.Namespace, *extra: str) -> subprocess.CompletedProcess:
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    base = [
        f"backbone.width={args.width}",
        "task=digits",
        "task.train_size=400",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.enable_progress_bar=false",
        f"trainer.accelerator={accelerator}",
        "data.batch_size=32",
        "data.num_workers=0",
        "logger=none",
        "extras.print_config=false",
    ]
    cmd = [sys.executable, str(ROOT / "train.py"), *extra, *base]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def results_ok(path: Path) -> tuple[bool, str]:
    if not path.exists():
        return False, f"no {path.name}"
    acc = json.loads(path.read_text()).get("test_acc")
    return acc is not None and math.isfinite(acc), f"test_acc {acc}"


def check_ddp(report: Report, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = train_py(args, "trainer=ddp", "trainer.devices=1", f"hydra.run.dir={tmp}")
        ok, text = results_ok(Path(tmp) / "results.json")
        ok = ok and proc.returncode == 0
        tail = "" if ok else f"; exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
        report.add(
            "ddp", "train.py trainer=ddp trainer.devices=1", f"{text}, {time.perf_counter() - start:.0f}s{tail}", ok
        )


def check_pool(report: Report, args: argparse.Namespace) -> None:
    cuda = args.device.startswith("cuda")
    pool = ["hydra.launcher.gpus=auto", "hydra.launcher.jobs_per_gpu=2"] if cuda else ["hydra.launcher.gpus=[0,1]"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = train_py(args, "-m", "hydra/launcher=pool", *pool, "patch=logits,bn", f"hydra.sweep.dir={tmp}")
        oks = [results_ok(Path(tmp) / str(n) / "results.json") for n in (0, 1)]
        outputs = [(Path(tmp) / ".pool" / str(n) / "output.log") for n in (0, 1)]
        on_gpu = all(p.exists() and "GPU available: True, used: True" in p.read_text() for p in outputs)
        ok = proc.returncode == 0 and all(o for o, _ in oks) and (on_gpu or not cuda)
        text = "; ".join(t for _, t in oks) + f"; both on a GPU: {on_gpu}; {time.perf_counter() - start:.0f}s"
        if proc.returncode != 0:
            text += f"; exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
        report.add("pool", f"train.py -m hydra/launcher=pool {' '.join(pool)} patch=logits,bn", text, ok)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    parser.add_argument("--quick", action="store_true", help="small model and few steps: a smoke run")
    parser.add_argument("--only", nargs="*", choices=CHECKS, default=list(CHECKS), help="checks to run")
    parser.add_argument("--kinds", nargs="*", default=None, help="patch kinds for step (default: full bn dw logits)")
    parser.add_argument("--saver-kinds", nargs="*", default=None, help="patch kinds for savers (default: all 7)")
    parser.add_argument("--compile-kinds", nargs="*", default=["bn", "full"], help="kinds also timed compiled")
    parser.add_argument("--compile-backend", default=None, help="default inductor (eager on CPU with --quick)")
    args = parser.parse_args()
    args.device = check_device(args.device)
    args.kinds = args.kinds or (["bn", "full"] if args.quick else ["full", "bn", "dw", "logits"])
    args.saver_kinds = args.saver_kinds or (["bn", "bias@frozen"] if args.quick else None)
    if args.saver_kinds is None:
        import saver_cost

        args.saver_kinds = list(saver_cost.KINDS)
    args.width, args.size = (0.25, 32) if args.quick else (1.0, 64)
    args.batch, args.steps = (16, 2) if args.quick else (128, 10)
    start = time.monotonic()
    report = Report()
    for name in args.only:
        try:
            globals()[f"check_{name}"](report, args)
        except Exception as err:  # a check that crashes is a failed check; the others still run
            report.add(name, "crashed", f"{type(err).__name__}: {err}", False)
    info = machine_info(args.device)
    print(f"\n{machine_line(info)} Command: {' '.join(sys.argv)}; {time.monotonic() - start:.0f}s in all.\n")
    print(md_table(["check", "what", "result", "status"], report.rows, align="llll"))
    if report.failed:
        print(f"\nGPU check FAILED ({len(report.failed)}):\n  " + "\n  ".join(report.failed), file=sys.stderr)
        return 1
    print(f"\nGPU check passed: {len(report.rows)} rows.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
