"""Start-up cost: wall time of a one-step ``python train.py`` run, and of importing ``modelpatch.run``.

Every run is a fresh process. A callback (``bench/probes.py:FirstStepProbe``, added with
``+callbacks.first_step._target_=...``) writes the wall-clock time of fit start and of the first
training step, so the run splits into: start-up until ``Trainer.fit`` starts, fit start to the
end of the first step, and the rest (teardown, results.json). ``-X importtime`` lists what the
imports spend their time on.

    .venv/bin/python bench/startup.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    ROOT,
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

TARGET_S = 10.0

TRAIN_ARGS = [
    "task=digits",
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "test=false",
    "logger=none",
    "callbacks=none",
    "extras.print_config=false",
    "export_patches=false",
    "trainer.enable_progress_bar=false",
    "optimized_metric=null",  # nothing is validated, so val/acc (the default) is never logged
]
PROBE = "+callbacks.first_step._target_=bench.probes.FirstStepProbe"


def run_train(out: Path, device: str) -> dict:
    out.mkdir(parents=True)
    probe_file = out / "probe.json"
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    cmd = [sys.executable, "train.py", *TRAIN_ARGS, f"trainer.accelerator={accelerator}", PROBE]
    cmd.append(f"hydra.run.dir={out / 'run'}")
    env = {**os.environ, "BENCH_PROBE_OUT": str(probe_file)}
    start_wall = time.time()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    marks = json.loads(probe_file.read_text()) if probe_file.exists() else {}
    result = {"total": total}
    if "fit_start" in marks:
        result["to_fit"] = marks["fit_start"] - start_wall
    if "first_batch_end" in marks:
        result["to_first_step_end"] = marks["first_batch_end"] - start_wall
        result["first_step"] = marks["first_batch_end"] - marks["first_batch_start"]
    if "fit_end" in marks and "first_batch_end" in marks:
        result["rest_of_fit"] = marks["fit_end"] - marks["first_batch_end"]
    if "atexit" in marks and "fit_end" in marks:
        result["after_fit"] = marks["atexit"] - marks["fit_end"]
    if "atexit" in marks:
        result["shutdown"] = start_wall + total - marks["atexit"]
    return result


# Garbage collection off while importing, then every object the imports made frozen (never
# scanned again, also not by the interpreter's final collection at exit).
GC_FREEZE = "import gc; gc.disable(); import {module}; gc.enable(); gc.freeze()"


def import_time(module: str, code: str = "import {module}") -> float:
    """Wall seconds of a fresh process that runs ``code`` (imports and interpreter exit)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code.format(module=module)], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def python_baseline() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def import_breakdown(module: str, top: int = 12) -> tuple[list[tuple[str, float]], float]:
    """Where importing ``module`` spends its time (``python -X importtime``): the self time of
    every module imported, summed per top-level package, in seconds; and the total."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=ROOT, check=True, capture_output=True,
        text=True,
    )  # fmt: skip
    totals: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| *(\S+)", line)
        if found:
            package = found.group(3).split(".")[0]
            totals[package] = totals.get(package, 0.0) + int(found.group(1)) / 1e6
    ranked = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
    return ranked[:top], sum(totals.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--runs", type=int, default=None, help="train.py runs (default 5; --quick 1)")
    args = parser.parse_args()
    device = check_device(args.device)
    apply_threads(args)
    runs = args.runs or (1 if args.quick else 5)
    info = machine_info(device)
    load_note = wait_for_quiet(max_wait=args.max_wait)
    print(f"[startup] {load_note}", file=sys.stderr)
    trains, imports, frozen, bases = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp, CpuMonitor() as monitor:
        for i in range(runs):  # interleaved: the import-only process between train.py runs
            trains.append(run_train(Path(tmp) / f"run{i}", device))
            imports.append(import_time("modelpatch.run"))
            frozen.append(import_time("modelpatch.run", GC_FREEZE))
            bases.append(python_baseline())
            print(f"[startup] run {i + 1}/{runs}: {trains[-1]}, import {imports[-1]:.2f}s", file=sys.stderr)
        breakdown, import_total = import_breakdown("modelpatch.run")
    total = median(t["total"] for t in trains)

    def med(key: str) -> str:
        values = [t[key] for t in trains if key in t]
        return f"{median(values):.2f}" if values else "n/a"

    rows = [
        ["`python train.py ...` one training step, whole process", f"{total:.2f}",
         ", ".join(f"{t['total']:.2f}" for t in trains)],
        ["  process start to `Trainer.fit` start (imports, Hydra, data, model)", med("to_fit"), ""],
        ["  process start to end of the first training step", med("to_first_step_end"), ""],
        ["  the first training step itself", med("first_step"), ""],
        ["  end of the first step to the end of `Trainer.fit` (teardown)",
         med("rest_of_fit"), ""],
        ["  end of fit to `atexit` (results.json, Hydra job end)", med("after_fit"), ""],
        ["  interpreter shutdown after `atexit` (module teardown, final garbage collection)", med("shutdown"), ""],
        ["`python -c 'import modelpatch.run'` (whole process)", f"{median(imports):.2f}",
         ", ".join(f"{v:.2f}" for v in imports)],
        [f"`python -c '{GC_FREEZE.format(module='modelpatch.run')}'`", f"{median(frozen):.2f}",
         ", ".join(f"{v:.2f}" for v in frozen)],
        ["`python -c 'pass'` (interpreter alone)", f"{median(bases):.2f}", ""],
    ]  # fmt: skip
    tab = md_table(["what", "seconds (median)", "each run"], rows, align="lrl")
    imp = md_table(
        ["top-level package", "import s (self time of its modules)", "share"],
        [[f"`{name}`", f"{secs:.2f}", f"{100 * secs / import_total:.0f}%"] for name, secs in breakdown]
        + [["all modules", f"{import_total:.2f}", "100%"]],
        align="lrr",
    )
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    command = " ".join(["python train.py", *TRAIN_ARGS, f"trainer.accelerator={accelerator}", "hydra.run.dir=<tmp>"])
    intro = (
        f"`{command}` (mobilenet_v2 1.0, `bn` patch, batch 128), {runs} fresh process(es), each followed by "
        f"a fresh `python -c 'import modelpatch.run'` and the same import with garbage collection off while "
        f"importing and the imported objects frozen after (`gc.freeze()`: never scanned again, not even by the "
        f"interpreter's final collection at exit). The split points come from a probe callback "
        f"(`{PROBE}`: wall-clock marks at fit start, first step start and end, fit end, and in an `atexit` "
        f"handler). Import breakdown: `python -X importtime -c 'import modelpatch.run'`, the self time of every "
        f"module loaded, summed per top-level package (one run; `-X importtime` itself slows imports a little)."
    )
    header = section_header("startup", "Start-up time of a one-step run", info, load_note, monitor)
    content = "\n\n".join([header, intro, tab, imp])
    target = (
        f"one-step `python train.py` run <= {TARGET_S:.0f} s ({device})",
        f"{total:.1f} s (to fit start {med('to_fit')} s; import of modelpatch.run {median(imports):.1f} s)",
        total <= TARGET_S,
    )
    finish("startup", content, args, target)


if __name__ == "__main__":
    main()
