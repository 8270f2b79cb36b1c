"""Shared helpers for the benchmark scripts: machine facts, load checks, and docs/benchmarks.md sections.

Each script owns one section of ``docs/benchmarks.md``, between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``, and one row of the targets summary; ``update_section`` rewrites only that
part, so the scripts can run alone or together (``bash bench/run_all.sh``). Text outside the
markers (the profile findings) is written by hand and never touched.

This module imports no torch at top level: ``startup.py`` imports it in the process it times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Sections in the order a new docs/benchmarks.md lists them.
SECTIONS = ("summary", "step-time", "feature-cache", "data-overhead", "startup", "serving")

INTRO = """# Benchmarks

What a patch saves when training and serving, measured on the machine named beside each table.
Reproduce every table (`run_all.sh` prints how long it took; most of it can be the waits for a quiet
machine):

```bash
bash bench/run_all.sh                  # all scripts, CPU; rewrites the tables below
bash bench/run_all.sh --quick          # smoke run: fewer repetitions, prints, writes nothing
bash bench/run_all.sh --device cuda    # on a GPU (adds torch.cuda.max_memory_allocated)
bash bench/run_all.sh --threads 1      # one intra-op thread (default: torch's, one per core)
bash bench/run_all.sh --max-wait 0     # do not wait for the load to drop
.venv/bin/python bench/step_time.py    # one table
```

Each script rewrites only its own table (between `<!-- bench:NAME -->` markers) and its row of
the summary; the notes outside the markers are written by hand from the profiles. Before timing,
a script waits (30 s at a time, up to 10 minutes) for the 1-minute load average to drop below
1.0, and records the load it measured under and the CPU other processes used meanwhile;
configurations compared with each other are timed in one process, interleaved and repeated, and
the medians are reported, so background load slows both sides.
"""


# --- machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, library versions, device and date (torch imported here, not at top)."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    if device.startswith("cuda"):
        info["device"] = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    versions = f"torch {info['torch']}" + (f", lightning {info['lightning']}" if "lightning" in info else "")
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores (torch threads: {info['torch_threads']}), "
        f"Python {info['python']}, {versions}; device: {info['device']}; date: {info['date']}."
    )


def command_line() -> str:
    """The command that produced a table, as someone would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rewrite this script's section of docs/benchmarks.md (default: yes, except with --quick)",
    )
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for a quiet machine")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)"
    )


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads N``: this process and the processes it starts use N intra-op threads."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    if not (device == "cpu" or device.startswith("cuda")):
        raise SystemExit(f"--device must be cpu or cuda[:N], got {device!r}")
    return device


def should_write(args: argparse.Namespace) -> bool:
    return (not args.quick) if args.write is None else args.write


def trainer_overrides(device: str) -> list[str]:
    """Quiet single-device trainer settings for runs built from the real config."""
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    return [
        f"trainer.accelerator={accelerator}",
        "trainer.devices=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "callbacks=none",
        "extras.print_config=false",
        f"data.fashion_mnist_dir={FASHION_MNIST}",
    ]


# --- load ---------------------------------------------------------------------------------


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def wait_for_quiet(threshold: float = 1.0, max_wait: float = 600.0, step: float = 30.0) -> str:
    """Wait (``step`` seconds at a time, at most ``max_wait``) until the 1-minute load is below
    ``threshold``; return a description of the load seen when measuring starts."""
    start = time.monotonic()
    load = loadavg()
    while load[0] > threshold and time.monotonic() - start + step <= max_wait:
        print(f"[bench] load average {load[0]:.2f} > {threshold}: waiting {step:.0f}s", file=sys.stderr, flush=True)
        time.sleep(step)
        load = loadavg()
    waited = time.monotonic() - start
    note = f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) at start"
    if waited > 1:
        note += f", after waiting {waited:.0f}s"
    if load[0] > threshold:
        note += f"; still above {threshold} after the {max_wait:.0f}s wait limit"
    return note


def _busy_jiffies() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return sum(fields) - fields[3] - fields[4]


def _own_jiffies() -> int:
    # utime stime cutime cstime: this process and its waited-for children
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15])


class CpuMonitor:
    """CPU used by *other* processes while a measurement runs (in cores, averaged over the window):
    machine-wide busy time from /proc/stat minus this process's (and its children's) own time."""

    def __enter__(self) -> CpuMonitor:
        self.t0, self.busy0, self.own0 = time.monotonic(), _busy_jiffies(), _own_jiffies()
        self.load0 = loadavg()
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.monotonic() - self.t0
        hz = os.sysconf("SC_CLK_TCK")
        self.own_cores = (_own_jiffies() - self.own0) / hz / max(elapsed, 1e-9)
        self.other_cores = max(0.0, (_busy_jiffies() - self.busy0 - (_own_jiffies() - self.own0)) / hz / elapsed)
        self.load1 = loadavg()
        self.elapsed = elapsed

    def describe(self) -> str:
        return (
            f"other processes used {self.other_cores:.2f} cores on average while it ran "
            f"({self.elapsed:.0f}s; this benchmark {self.own_cores:.2f} cores); "
            f"load average {self.load1[0]:.2f} at the end"
        )


# --- statistics and formatting ------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``fn`` takes (``sync`` waits for queued device work)."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def fmt_mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def md_table(header: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one letter per column (l/r), right-aligned by default."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section_header(name: str, title: str, info: dict, load_note: str, monitor: CpuMonitor | None = None) -> str:
    lines = [f'<a id="{name}"></a>', "", f"## {title}", "", f"Command: `{command_line()}`", "", machine_line(info), ""]
    load = f"Load: {load_note}"
    if monitor is not None:
        load += f"; {monitor.describe()}"
    lines.append(load + ".")
    return "\n".join(lines)


# --- docs/benchmarks.md -------------------------------------------------------------------


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def _new_doc() -> str:
    blocks = [INTRO.rstrip()]
    for name in SECTIONS:
        start, end = _markers(name)
        blocks.append(f"{start}\n_(not measured yet: run `bash bench/run_all.sh`)_\n{end}")
    return "\n\n".join(blocks) + "\n"


def update_section(name: str, content: str, doc: Path = DOC) -> Path:
    """Replace the text between ``<!-- bench:name -->`` and ``<!-- /bench:name -->`` in ``doc``;
    create the file (intro + empty sections) or append the section when missing."""
    text = doc.read_text() if doc.exists() else _new_doc()
    start, end = _markers(name)
    block = f"{start}\n{content.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f".{doc.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(doc)
    return doc


def read_section(name: str, doc: Path = DOC) -> str | None:
    if not doc.exists():
        return None
    start, end = _markers(name)
    found = re.search(re.escape(start) + r"\n?(.*?)\n?" + re.escape(end), doc.read_text(), re.S)
    return found.group(1) if found else None


_DATA = re.compile(r"<!-- bench-data: (.*?) -->", re.S)

# Display order of the summary rows.
TARGET_ORDER = ("step-time", "feature-cache", "data-overhead", "startup", "serving")


def update_target(key: str, target: str, measured: str, met: bool | None, doc: Path = DOC) -> None:
    """Set one row of the summary table (the rows are kept as JSON in a comment of the section)."""
    current = read_section("summary", doc) or ""
    found = _DATA.search(current)
    rows = json.loads(found.group(1)) if found else {}
    rows[key] = {"target": target, "measured": measured, "met": met, "date": dt.date.today().isoformat()}
    order = [k for k in TARGET_ORDER if k in rows] + sorted(k for k in rows if k not in TARGET_ORDER)
    table = md_table(
        ["benchmark", "target", "measured", "met?", "date"],
        [
            [
                f"[{k}](#{k})",
                rows[k]["target"],
                rows[k]["measured"],
                {True: "yes", False: "**no**", None: "n/a"}[rows[k]["met"]],
                rows[k]["date"],
            ]
            for k in order
        ],
        align="lllll",
    )
    content = f"## Summary\n\n{table}\n\n<!-- bench-data: {json.dumps(rows, sort_keys=True)} -->"
    update_section("summary", content, doc)


Target = tuple[str, str, bool | None]  # (target, measured, met)


def finish(name: str, content: str, args: argparse.Namespace, target: Target | None = None) -> None:
    """Print the section; write it (and its ``(target, measured, met)`` summary row) to
    docs/benchmarks.md unless this is a smoke run."""
    print(content)
    if target is not None:
        print(f"[bench] target {target[0]}: measured {target[1]}, met: {target[2]}", file=sys.stderr)
    if should_write(args):
        update_section(name, content)
        if target is not None:
            update_target(name, *target)
        print(f"[bench] wrote section {name!r} of {DOC.relative_to(ROOT)}", file=sys.stderr)
    else:
        print("[bench] not written (--quick or --no-write)", file=sys.stderr)
