"""Every command of README.md and docs/*.md, run as written in a fresh copy of the checkout (issue 17).

Collected: the statements of each ```bash or unlabelled fenced block (not ```text, ```json, nor the two
pictures in PICTURES). A line continued with ``\\`` is one statement, and so is a ``for ... done`` loop (with the
``wait`` after it). Assignments, ``export`` and ``source`` are the block's setup: they run again before each
later command of their block, in the same shell script as it.

Run: one fresh copy per block (the files ``git ls-files`` lists and nothing else: no runs/, no data/), as the
working directory; the commands of a block run in order in their copy, so a later one finds what an earlier one
wrote (a placeholder such as ``<date>`` is the folder the command named in PLACEHOLDERS made there). ``PATH``
starts with the copy's ``.venv/bin``, as after the README's ``source .venv/bin/activate``. That venv is this
test's: ``.venv/bin/python`` is a wrapper that adds BUDGET to each ``train.py`` command line (at the end, or
just before a final ``-m``/``--multirun``: Hydra's argparse takes nothing after it) and to ``python -m
modelpatch.sweep agents <sweep file>`` (overrides after the file go to every run), says so on stderr, then runs
this interpreter with the copy's src/ first on ``PYTHONPATH`` (as ``pip install -e .`` in the copy would).
Nothing else is added; where the outputs go is the command's own doing.

BUDGET: 2 training steps, then validation (``val/acc_best``, the metric train.py returns) and test on one batch
of 128 each (a full evaluation batch is 512 images: 8x the work for nothing the test checks; Lightning's sanity
check takes that one batch too). ``trainer.max_steps``, not ``max_epochs``: a sweep file may set ``trainer.max_epochs``
(sweeps/embedded_bayes.yaml does) and the sweeper refuses a command line that sets it too; with 2 batches per
epoch, step 2 ends the first epoch, which is validated. ``data.cache_features=false``: a ``logits`` run would
first compute the features of every image of every split, which no trainer limit bounds (74 s against 9 s for
``python train.py patch=logits`` with the budget, on 2 loaded cores); its head trains through the frozen backbone
instead, the same computation (docs/architecture.md). An Optuna search also gets SEARCH_BUDGET (2 trials).
The model is the documented one (mobilenet_v2 1.0 at 32x32 by default).

Checked: exit status 0, and the outputs where the docs say: a train.py run's ``results.json`` in
``runs/<task>/runs/<date>/`` or, for a multirun, one per job in ``runs/<task>/multiruns/<date>/<n>/`` (or under
``hydra.run.dir``/``hydra.sweep.dir`` when the command sets one), and nowhere else; for the other programs, see
expected_outputs. NOT_RUN lists what does not run here, with the reason (a skip). conftest.py's
pytest_terminal_summary ends the output with every command run (time, budget) and not run (reason). A command
neither runnable nor listed fails test_every_command_is_run_or_listed; an entry of a table that names no
documented command fails test_tables_name_documented_commands.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .support import ROOT

pytestmark = pytest.mark.slow

DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
BUDGET = [
    "trainer.max_steps=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.eval_batch_size=128",
    "data.cache_features=false",
]
SEARCH_BUDGET = ["hydra.sweeper.n_trials=2"]  # an Optuna search (hparams_search=...): 2 trials, not 20
TIMEOUT_S = 540
# The task of a run that names none (README: "python train.py  # mobilenet_v2, bn patch, fmnist_b").
DEFAULT_TASK = next(d["task"] for d in OmegaConf.load(ROOT / "conf" / "train.yaml").defaults if "task" in d)

# Unlabelled blocks that are pictures, not commands: (doc, start of the block's first line).
PICTURES = [
    ("README.md", "train.py                 thin Hydra entry"),
    ("docs/architecture.md", "conf/ (Hydra) ─► models/backbones"),
]

# Placeholder -> (the command of the same block that makes the folder, the folder it stands for: {dir} is that
# command's run or sweep folder, relative to the copy, {name} its last part).
PLACEHOLDERS = {
    "<date>": ("python train.py -m patch=logits,bn,dw,bn+dw,full", "{name}"),  # runs/fmnist_b/multiruns/<date>
    "<multi-task run>": ("python train.py task=multi patch=bn", "{dir}"),
    "<...>": ("python train.py task=multi patch=bn", "{dir}/checkpoints"),  # <...>/best.ckpt
    "<run>": ("python train.py task=multi patch=bn", "{dir}"),  # <run>/patches/fmnist_b.safetensors
}

NO_W_AND_B_SERVER = "needs a W&B server (a sweep id is what it issues; here W&B runs offline)"
BENCHMARK = "a benchmark (times, peak memory; rewrites docs/benchmarks.md's tables), not a check: run by hand"
MULTINODE_BENCH = (
    "the body of the benchmark bench/multinode_cpu.sh (2 nodes x 1 device against 1 node x 2 devices, 5 epochs "
    "each); tests/test_multinode.py runs the same comparison"
)

MEASUREMENT_ROW = (
    "a row of docs/clusters.md's measured table (1 epoch each); with the budget it takes the path of another row, "
    "with other numbers (batch size, learning rate, warmup), which runs here (time spared): "
)

RECIPE_TABLE = (
    "reads the study's run folders (runs/study, made by the study above); tests/test_recipe_table.py runs it "
    "on run folders it writes as train.py does"
)

# Documented commands that do not run here (normalized text: comments dropped, whitespace collapsed) -> why.
NOT_RUN = {
    "make main": (
        "4 min on 2 cores (pretraining, 5 transfer runs of 320 steps, the report) plus the install: run by hand "
        "(docs/results.md records its last run); its three commands run here with the budget (docs/results.md, "
        "first block)"
    ),
    "make test": "the test suite itself, this test included",
    "bash scripts/recipe_study.sh": (
        "the recipe study: about 258 runs of 16-600 steps, 2 at a time (about 2.5 h on 2 cores); "
        "docs/results.md#recipes records its runs and wall times, and the stages' train.py multiruns are those "
        "of the transfer experiment that README.md and make main run here with the budget"
    ),
    "python scripts/recipe_table.py runs/study --csv docs/recipes.csv --plot docs/img/recipes.png": RECIPE_TABLE,
    "python scripts/recipe_table.py runs/study --backbone resnet18": RECIPE_TABLE,
    "python train.py patch=bn+dw backbone.weights=imagenet": (
        "needs torchvision's ImageNet weights in the torch hub cache (a download: no internet here)"
    ),
    "python train.py -m hydra/launcher=slurm trainer=ddp trainer.num_nodes=2 trainer.devices=4": (
        "needs 2 nodes with 4 GPUs each (the local cluster: one node, no GPU; tests/test_slurm_nodes.py checks "
        "what sbatch is asked for a 2-node job, held)"
    ),
    "python -m modelpatch.sweep agents --agents 4 --count 5 <entity>/modelpatch/<sweep id>": NO_W_AND_B_SERVER,
    "python train.py -m hydra/launcher=pool patch=logits,bn,dw,bn+dw,full seed=0,1,2": (
        "15 jobs, one at a time on a machine without a GPU, each its own process (15-30 s each here: 4 min or "
        "more); the pool launcher runs in docs/clusters.md's `hydra/launcher=pool hydra.launcher.gpus=[0,2,3] "
        "hydra.launcher.jobs_per_gpu=2 patch=bn,dw` (2 jobs at once) and in tests/test_pool.py"
    ),
    "bash bench/run_all.sh": BENCHMARK,
    "bash bench/run_all.sh --quick": BENCHMARK + " (its smoke run)",
    "bash bench/run_all.sh --device cuda": BENCHMARK + "; needs a GPU",
    "bash bench/run_all.sh --threads 1": BENCHMARK,
    "bash bench/run_all.sh --max-wait 0": BENCHMARK,
    ".venv/bin/python bench/step_time.py": BENCHMARK,
    ".venv/bin/python bench/mask_bytes.py --threads 2 --rounds 7": BENCHMARK,
    ".venv/bin/python bench/serving_crossover.py": BENCHMARK,
    ".venv/bin/python bench/resume_exact.py": (
        "11 starts of the transfer run (twice uninterrupted, 3 runs killed and restarted 1-4 times; about 2 min "
        "after a 95 s pretraining): run by hand (docs/clusters.md records its last run); tests/test_faults.py kills "
        "and compares tiny runs"
    ),
    "python train.py -m hydra/launcher=slurm trainer=ddp trainer.devices=4 hydra.launcher.partition=gpu": (
        "needs a SLURM partition 'gpu' with 4 GPUs per node (the local cluster has 'debug', no GPU)"
    ),
    "python train.py -m hydra/launcher=slurm trainer=ddp trainer.num_nodes=2 trainer.devices=4 "
    "hydra.launcher.partition=gpu task=multi 'task.tasks=[imagenet,places365]' task.mixing=per_device "
    "data.num_workers=8": "needs 2 nodes with 4 GPUs each and ImageNet and Places365 on disk",
    "for NODE in 0 1; do MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 WORLD_SIZE=2 NODE_RANK=$NODE LOCAL_RANK=0 "
    ".venv/bin/python train.py $COMMON trainer.num_nodes=2 trainer.devices=1 hydra.run.dir=runs/multinode/$MIX-2nodes "
    "& done wait": MULTINODE_BENCH,
    ".venv/bin/python train.py $COMMON trainer.num_nodes=1 trainer.devices=2 hydra.run.dir=runs/multinode/$MIX-1node": (
        MULTINODE_BENCH
    ),
    ".venv/bin/python bench/compare_runs.py runs/multinode/$MIX-2nodes runs/multinode/$MIX-1node": MULTINODE_BENCH,
    "python train.py $C data.batch_size=384": MEASUREMENT_ROW + "`python train.py $C data.batch_size=128`",
    "python train.py $C trainer.strategy=ddp trainer.devices=3 data.batch_size=43": (
        MEASUREMENT_ROW + "`python train.py $C trainer.strategy=ddp trainer.devices=3 data.batch_size=128`"
    ),
    "python train.py $C data.batch_size=384 optim.lr=0.15 optim.warmup_epochs=0.25": (
        MEASUREMENT_ROW + "`python train.py $C data.batch_size=128`"
    ),
    "wandb sweep sweeps/patch_x_task.yaml": NO_W_AND_B_SERVER,
    "wandb agent <entity>/modelpatch/<sweep id>": NO_W_AND_B_SERVER,
    "python -m modelpatch.sweep agents --agents 4 --count 5 --partition gpu --gpus-per-task 1 --cpus-per-task 8 "
    "--mem-gb 32 --time 600 <entity>/modelpatch/<sweep id>": NO_W_AND_B_SERVER + "; and a SLURM partition 'gpu'",
}

DATE = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


# ------------------------------------------------------------------------------------------------ collecting


def normalize(script: str) -> str:
    """A statement as one line: comments dropped, continuations joined, whitespace collapsed."""
    lines = [re.sub(r"(^|\s)#.*$", "", line).rstrip().removesuffix("\\") for line in script.splitlines()]
    return " ".join(" ".join(lines).split())


@dataclass(frozen=True)
class Command:
    doc: str
    line: int  # of its first line in doc
    block: str  # doc:line of the block's opening fence
    script: str  # as written: continuations, comments
    setup: tuple[str, ...]  # the block's assignments, export and source before it

    @property
    def text(self) -> str:
        return normalize(self.script)

    @property
    def id(self) -> str:
        text = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        return f"{self.doc}:{self.line} {text}"


def fenced_blocks(doc: str) -> list[tuple[int, str, list[str]]]:
    """(line of the opening fence, label, lines) of each fenced block, indentation of the fence removed."""
    lines = (ROOT / doc).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            indent, label, start, body = len(m.group(1)), m.group(2), i + 1, []
            i += 1
            while not re.match(r"^\s*```\s*$", lines[i]):
                body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
                i += 1
            blocks.append((start, label, body))
        i += 1
    return blocks


def statements(lines: list[str]) -> list[tuple[int, str]]:
    """(index of the first line, script) of each statement: continuations and loops joined."""
    out, i = [], 0
    while i < len(lines):
        s = lines[i].strip()
        if not s or s.startswith("#"):
            i += 1
            continue
        start, chunk = i, [lines[i]]
        if re.match(r"(for|while|until)\s", s):
            while not re.match(r"\s*done\b", lines[i]):
                i += 1
                chunk.append(lines[i])
            if any(re.search(r"&\s*$", c) for c in chunk) and i + 1 < len(lines) and lines[i + 1].strip() == "wait":
                i += 1
                chunk.append(lines[i])  # the loop started its jobs in the background; wait belongs to it
        else:
            while chunk[-1].rstrip().endswith("\\"):
                i += 1
                chunk.append(lines[i])
        out.append((start, "\n".join(chunk)))
        i += 1
    return out


def is_setup(script: str) -> bool:
    words = shlex.split(script, comments=True)
    return bool(words) and (words[0] in ("source", ".", "export") or all(ASSIGNMENT.match(w) for w in words))


def is_picture(doc: str, body: list[str]) -> bool:
    return any(doc == d and body and body[0].startswith(start) for d, start in PICTURES)


def collect() -> list[Command]:
    commands = []
    for doc in DOCS:
        for fence, label, body in fenced_blocks(doc):
            if label not in ("bash", "") or is_picture(doc, body):
                continue
            setup: list[str] = []
            for index, script in statements(body):
                if is_setup(script):
                    setup.append(script)
                else:
                    commands.append(Command(doc, fence + 1 + index, f"{doc}:{fence}", script, tuple(setup)))
    return commands


COMMANDS = collect()


def producer(cmd: Command, placeholder: str) -> Command:
    """The command of cmd's block that makes the folder a placeholder stands for."""
    text = PLACEHOLDERS[placeholder][0]
    found = [c for c in COMMANDS if c.block == cmd.block and c.text == text and c.line < cmd.line]
    if not found:
        raise LookupError(f"{cmd.id}: {placeholder} comes from {text!r}, which its block does not run before it")
    return found[-1]


# ------------------------------------------------------------------------------------------- fresh copies

WRAPPER = '''#!{real}
"""tests/test_docs_commands.py's stand-in for this copy's python: adds the test's budget to train.py and to
`-m modelpatch.sweep agents <sweep file>`, logs the command line, then runs the test's interpreter on this
copy's src/."""
import json, os, sys

args = sys.argv[1:]
train = bool(args) and os.path.basename(args[0]) == "train.py"
agents = args[:3] == ["-m", "modelpatch.sweep", "agents"] and any(a.endswith((".yaml", ".yml")) for a in args)
if train or agents:
    budget = {budget!r}
    if any(a.startswith("hparams_search=") for a in args):
        budget += {search_budget!r}
    at = len(args) - 1 if train and args[-1] in ("-m", "--multirun") else len(args)
    args[at:at] = budget
    print("[test_docs_commands] budget added: " + " ".join(budget), file=sys.stderr, flush=True)
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in ({src!r}, os.environ.get("PYTHONPATH")) if p)
os.execv({real!r}, [{real!r}, *args])
'''

ACTIVATE = """# tests/test_docs_commands.py: this copy's venv is the test's interpreter, behind bin/python (the budget)
export VIRTUAL_ENV={venv}
export PATH="$VIRTUAL_ENV/bin:$PATH"
"""


def fresh_copy(dest: Path) -> Path:
    """The files git lists, copied (links as links), and a .venv whose python is the budget wrapper."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in filter(None, listed.stdout.split("\0")):
        src, dst = ROOT / rel, dest / rel
        if not src.is_symlink() and not src.exists():
            continue  # deleted in this working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    bin_dir = dest / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    log = dest / ".venv" / "calls.jsonl"
    wrapper = WRAPPER.format(
        real=sys.executable, budget=BUDGET, search_budget=SEARCH_BUDGET, log=str(log), src=str(dest / "src")
    )
    python.write_text(wrapper)
    python.chmod(0o755)
    (bin_dir / "activate").write_text(ACTIVATE.format(venv=dest / ".venv"))
    return dest


# ------------------------------------------------------------------------------------------------ outputs


def option(args: list[str], key: str) -> str | None:
    """The value a command line gives key (the last one wins, as in Hydra)."""
    values = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else None


def top_level_commas(value: str) -> int:
    depth, n = 0, 1
    for ch in value:
        depth += ch in "[({"
        depth -= ch in "])}"
        n += ch == "," and depth == 0
    return n


def job_count(args: list[str]) -> int:
    """Jobs of a multirun: the sweeper's trials or count, else the product of the swept values."""
    if option(args, "hydra/sweeper") == "wandb":
        return int(option(args, "hydra.sweeper.count"))
    search = option(args, "hparams_search")
    if search:
        n = option(args, "hydra.sweeper.n_trials")
        return int(n or OmegaConf.load(ROOT / "conf" / "hparams_search" / f"{search}.yaml").hydra.sweeper.n_trials)
    swept = [a.split("=", 1)[1] for a in args if "=" in a and not a.split("=", 1)[0].startswith("hydra")]
    return math.prod(top_level_commas(v) for v in swept)


def new_dated_folder(parent: Path, before: set[Path], problems: list[str]) -> Path | None:
    made = [p for p in parent.glob("*") if DATE.fullmatch(p.name) and p not in before] if parent.is_dir() else []
    if len(made) != 1:
        problems.append(f"expected one new dated folder under {parent}, found {sorted(p.name for p in made)}")
        return None
    return made[0]


def train_outputs(args: list[str], copy: Path, before: set[Path], problems: list[str]) -> tuple[Path, set[Path]]:
    """A train.py command line's run or sweep folder and the results.json files it must have written."""
    multirun = "-m" in args or "--multirun" in args or option(args, "hparams_search") is not None
    task = option(args, "task") or DEFAULT_TASK
    given = option(args, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    layout = copy / "runs" / task / ("multiruns" if multirun else "runs")
    folder = copy / given if given else new_dated_folder(layout, before, problems)
    if folder is None:
        return layout, set()
    if not multirun:
        return folder, {folder / "results.json"}
    return folder, {folder / str(n) / "results.json" for n in range(job_count(args))}


def report_outputs(args: list[str], copy: Path) -> tuple[Path, set[Path]]:
    """python -m modelpatch.report <root> [--out <folder>]: report.{md,csv,png} in the folder (default: root)."""
    root, rest = args[2], args[3:]
    out = next((b for a, b in itertools.pairwise(rest) if a == "--out"), None)
    out = next((a.split("=", 1)[1] for a in rest if a.startswith("--out=")), out)
    folder = copy / (out or root)
    return folder, {folder / f"report.{ext}" for ext in ("md", "csv", "png")}


VALUED_FLAGS = {
    "--agents",
    "--count",
    "--partition",
    "--time",
    "--cpus-per-task",
    "--mem-gb",
    "--gpus-per-task",
    "--dir",
}


def agents_outputs(args: list[str], copy: Path) -> tuple[Path, set[Path]]:
    """python -m modelpatch.sweep agents: --dry-run writes runs/agents/<sweep id>/agents.sbatch; with a sweep
    file, the agents' runs land in its folder (--dir, default runs/sweeps/<sweep name>/<n>), --count each."""
    rest = args[3:]
    flags = {a: b for a, b in itertools.pairwise(rest) if a in VALUED_FLAGS}
    target = next(b for a, b in itertools.pairwise(["", *rest]) if not b.startswith("-") and a not in VALUED_FLAGS)
    if "--dry-run" in rest:
        folder = copy / "runs" / "agents" / target.split("/")[-1]
        return folder, {folder / "agents.sbatch"}
    name = OmegaConf.load(copy / target).get("name")
    folder = copy / (flags.get("--dir") or f"runs/sweeps/{name}")
    runs = int(flags["--agents"]) * int(flags["--count"])
    return folder, {folder / str(n) / "results.json" for n in range(runs)}


def program(args: list[str]) -> str | None:
    """Which program a python command line runs: a script's name, or the module (and its subcommand)."""
    if args and args[0].endswith(".py"):
        return os.path.basename(args[0])
    if args[:1] == ["-m"] and len(args) > 1:
        return " ".join(args[1:3]) if args[1] in ("modelpatch.serving", "modelpatch.sweep") else args[1]
    return None


CHECKED_PROGRAMS = {"train.py", "eval.py", "modelpatch.report", "modelpatch.serving storage", "modelpatch.sweep agents"}


def expected_outputs(
    args: list[str], copy: Path, before: set[Path], stdout: str, problems: list[str]
) -> tuple[Path | None, set[Path]]:
    """Where the docs say one program call's outputs go: (its folder, the files it must have written)."""
    name = program(args)
    if name == "train.py":
        return train_outputs(args, copy, before, problems)
    if name == "eval.py":  # conf/eval.yaml: runs/eval/<date>/eval_results.json
        folder = new_dated_folder(copy / "runs" / "eval", before, problems)
        return folder, {folder / "eval_results.json"} if folder else set()
    if name == "modelpatch.report":
        return report_outputs(args, copy)
    if name == "modelpatch.serving storage":  # prints the summary, writes nothing
        try:
            summary = json.loads(stdout)
            assert summary["ratio"] > 0 and summary["tasks"] >= 1
        except (ValueError, KeyError, AssertionError, TypeError):
            problems.append(f"modelpatch.serving storage printed no storage summary: {stdout[-500:]!r}")
        return None, set()
    if name == "modelpatch.sweep agents":
        return agents_outputs(args, copy)
    raise LookupError(f"no output check for: python {shlex.join(args)} (CHECKED_PROGRAMS)")


def program_calls(text: str) -> list[list[str]]:
    """The python command lines a documented statement makes (for the static checks: $VARS left as written)."""
    try:
        words = shlex.split(text)
    except ValueError:
        return []
    calls, i = [], 0
    while i < len(words):
        if words[i] in ("python", ".venv/bin/python"):
            j = i + 1
            while j < len(words) and words[j] not in ("&", ";", "&&", "done", "wait"):
                j += 1
            calls.append(words[i + 1 : j])
            i = j
        i += 1
    return calls


def has_output_check(cmd: Command) -> bool:
    """Whether the command runs python, and only programs expected_outputs checks."""
    calls = program_calls(cmd.text)
    return bool(calls) and all(program(c) in CHECKED_PROGRAMS for c in calls)


# --------------------------------------------------------------------------------------------------- runs


@dataclass
class Outcome:
    cmd: Command
    script: str
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    calls: list[list[str]] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def report(self) -> str:
        calls = "\n".join("  python " + shlex.join(c) for c in self.calls) or "  (no python call)"
        problems = "\n".join(f"  {p}" for p in self.problems)
        return (
            f"{self.cmd.id}\nscript:\n{self.script}\nexit status {self.returncode} after {self.seconds:.1f}s; "
            f"python calls (budget included):\n{calls}\n{problems}\nstderr (tail):\n{self.stderr[-4000:]}\n"
            f"stdout (tail):\n{self.stdout[-1500:]}"
        )


def cancel_slurm_jobs(copy: Path) -> None:
    """Cancel the SLURM jobs still queued or running from this copy (a failed or timed-out command's)."""
    if shutil.which("squeue") is None:
        return
    proc = subprocess.run(["squeue", "-h", "-o", "%A %Z"], capture_output=True, text=True, timeout=30)
    ids = [line.split()[0] for line in proc.stdout.splitlines() if str(copy) in line]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


class Runner:
    """The documented commands, each block in its own fresh copy, each command once (cached)."""

    def __init__(self, base: Path):
        self.base = base
        self.copies: dict[str, Path] = {}
        self.outcomes: dict[Command, Outcome] = {}

    def copy_for(self, cmd: Command) -> Path:
        if cmd.block not in self.copies:
            name = re.sub(r"\W+", "_", cmd.block)
            self.copies[cmd.block] = fresh_copy(self.base / name)
        return self.copies[cmd.block]

    def substitute(self, cmd: Command) -> str:
        script = cmd.script
        for placeholder in sorted(set(PLACEHOLDERS) & set(PLACEHOLDER.findall(normalize(script)))):
            made = self.run(producer(cmd, placeholder))
            if made.returncode != 0 or made.problems or not made.folders:
                pytest.fail(f"{placeholder} comes from {made.cmd.id}, which failed:\n{made.report()}")
            folder = made.folders[0].relative_to(self.copies[cmd.block])
            value = PLACEHOLDERS[placeholder][1].format(dir=folder.as_posix(), name=folder.name)
            script = script.replace(placeholder, value)
        return script

    def run(self, cmd: Command) -> Outcome:
        if cmd in self.outcomes:
            return self.outcomes[cmd]
        copy = self.copy_for(cmd)
        script = "\n".join([*cmd.setup, self.substitute(cmd)])
        log = copy / ".venv" / "calls.jsonl"
        done_calls = len(log.read_text().splitlines()) if log.exists() else 0
        before = {p for p in copy.rglob("*") if p.is_dir()}
        before_files = {p: p.stat().st_mtime for p in copy.rglob("*") if p.is_file()}
        env = {
            **os.environ,
            "VIRTUAL_ENV": str(copy / ".venv"),
            "PATH": f"{copy / '.venv' / 'bin'}:{os.environ['PATH']}",
        }
        start = time.monotonic()
        proc = subprocess.Popen(
            ["bash", "-c", script], cwd=copy, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stderr += f"\n[test_docs_commands] killed after {TIMEOUT_S}s"
        seconds = time.monotonic() - start
        cancel_slurm_jobs(copy)
        calls = [json.loads(line) for line in log.read_text().splitlines()[done_calls:]] if log.exists() else []
        out = Outcome(cmd, script, proc.returncode, seconds, stdout, stderr, calls)
        self.outcomes[cmd] = out
        if proc.returncode == 0:
            self.check_outputs(out, copy, before, before_files)
        return out

    @staticmethod
    def check_outputs(out: Outcome, copy: Path, before: set[Path], before_files: dict[Path, float]) -> None:
        if not out.calls:
            out.problems.append("the command ran no python")
        expected: set[Path] = set()
        for args in out.calls:
            folder, files = expected_outputs(args, copy, before, out.stdout, out.problems)
            if folder is not None and folder not in out.folders:
                out.folders.append(folder)
            expected |= files
        written = {p for p in copy.rglob("*") if p.is_file() and before_files.get(p) != p.stat().st_mtime}
        missing = sorted(str(p.relative_to(copy)) for p in expected - written)
        if missing:
            out.problems.append(f"not written where the docs say: {missing}")
        results = {p for p in written if p.name == "results.json"}
        stray = sorted(str(p.relative_to(copy)) for p in results - expected)
        if stray:
            out.problems.append(f"results.json written where the docs do not say: {stray}")


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    """The runner; afterwards, the copies whose every command passed are removed (2 GB in all), the others kept."""
    runner = Runner(tmp_path_factory.mktemp("docs_commands"))
    yield runner
    for block, copy in runner.copies.items():
        outcomes = [o for c, o in runner.outcomes.items() if c.block == block]
        if all(o.returncode == 0 and not o.problems for o in outcomes):
            shutil.rmtree(copy, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.timeout(TIMEOUT_S * 3)  # a command may first run the one that makes its placeholder's folder
# one block's commands on one xdist worker, in order: a later command reads what an earlier one wrote
@pytest.mark.parametrize("cmd", [pytest.param(c, id=c.id, marks=pytest.mark.xdist_group(c.block)) for c in COMMANDS])
def test_documented_command(cmd: Command, runner: Runner, record_property):
    """conftest.py's pytest_terminal_summary lists each command from the recorded properties."""
    record_property("documented_command", cmd.id)
    if cmd.text in NOT_RUN:
        record_property("not_run", NOT_RUN[cmd.text])
        pytest.skip(f"not run: {NOT_RUN[cmd.text]}")
    out = runner.run(cmd)
    train = [c for c in out.calls if program(c) == "train.py"]
    if train:
        search = any(a.startswith("hparams_search=") for c in train for a in c)
        record_property("budget", " ".join(BUDGET + (SEARCH_BUDGET if search else [])))
    assert out.returncode == 0, out.report()
    assert not out.problems, out.report()


def test_every_command_is_run_or_listed():
    """Each documented command either runs here (its placeholders come from an earlier command, each program it
    runs has an output check) or is in NOT_RUN with a reason."""
    unhandled = []
    for cmd in COMMANDS:
        if cmd.text in NOT_RUN:
            continue
        unknown = set(PLACEHOLDER.findall(cmd.text)) - set(PLACEHOLDERS)
        try:
            for placeholder in set(PLACEHOLDER.findall(cmd.text)) & set(PLACEHOLDERS):
                producer(cmd, placeholder)
        except LookupError as err:
            unhandled.append(str(err))
        if unknown:
            unhandled.append(f"{cmd.id}: placeholders {sorted(unknown)} name no folder made here (PLACEHOLDERS)")
        if not has_output_check(cmd):
            unhandled.append(f"{cmd.id}: runs no program with an output check (expected_outputs)")
    assert not unhandled, "documented commands neither runnable nor in NOT_RUN:\n" + "\n".join(unhandled)


def test_tables_name_documented_commands():
    texts = {c.text for c in COMMANDS}
    stale = [f"NOT_RUN: {t}" for t in NOT_RUN if t not in texts]
    stale += [f"PLACEHOLDERS[{p}]: {t}" for p, (t, _) in PLACEHOLDERS.items() if t not in texts]
    blocks = {doc: [body for _, label, body in fenced_blocks(doc) if label == ""] for doc in DOCS}
    stale += [f"PICTURES: {d}: {s}" for d, s in PICTURES if not any(b and b[0].startswith(s) for b in blocks[d])]
    assert not stale, "table entries naming nothing in the docs any more:\n" + "\n".join(stale)


CARD = "python train.py patch=bn+dw task=multi -m"


@pytest.mark.xdist_group(next((c.block for c in COMMANDS if c.text == CARD), "card"))  # where its block runs
def test_the_card_command_runs_with_the_budget_before_its_final_m(runner: Runner):
    """The headline command, which once failed on a fresh clone (hydra.sweep.dir resolved before any job); run
    once, by test_documented_command or here."""
    (card,) = [c for c in COMMANDS if c.text == CARD]
    assert card.text not in NOT_RUN
    out = runner.run(card)
    assert out.calls == [["train.py", "patch=bn+dw", "task=multi", *BUDGET, "-m"]], out.report()
    assert out.returncode == 0 and not out.problems, out.report()
    assert [f.relative_to(runner.copies[card.block]).parts[:3] for f in out.folders] == [("runs", "multi", "multiruns")]
