"""Multi-node SLURM jobs: ``trainer.num_nodes`` and ``trainer.devices`` shape the job (``--nodes``,
``--ntasks-per-node``), a job that does not fit the trainer stops before anything is submitted, and a
``trainer.num_nodes=2`` multirun submitted to the local one-node cluster asks SLURM for two nodes (it cannot run
there: it is checked while it waits, then cancelled). No cluster is a failure, never a skip."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import modelpatch.resolvers  # noqa: F401  (registers the mp.* resolvers the launcher configs use)
from modelpatch.cluster.callbacks import slurm_shape_problems
from modelpatch.cluster.slurm import SlurmResourceError, slurm_nodes

from .support import CLI_TINY, CONF, ROOT, START_CLUSTER, train_py_slurm

JOB_DIR = re.compile(r"(\d+)(?:_\d+)?")


def composed(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def test_nodes_and_tasks_follow_the_trainer():
    cfg = composed("trainer=ddp", "trainer.accelerator=cpu", "trainer.num_nodes=3", "trainer.devices=2")
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (3, 2)
    assert slurm_shape_problems(cfg) == []
    cfg = composed("trainer.accelerator=cpu")  # the defaults: one node, one task
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (1, 1)
    assert slurm_nodes(2, "auto") == 2 and slurm_nodes("2", "ddp_find_unused_parameters_true") == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hydra.launcher.tasks_per_node=4"], r"hydra.launcher.tasks_per_node=4 but trainer.devices asks for 2"),
        (["hydra.launcher.nodes=2"], r"hydra.launcher.nodes=2 but trainer.num_nodes asks for 1.*trainer.num_nodes=2"),
        (["trainer.num_nodes=0"], r"trainer.num_nodes=0: set it to a number of nodes"),
        (["trainer.num_nodes=2", "trainer.strategy=ddp_spawn"], r"num_nodes=2 with trainer.strategy=ddp_spawn.*=ddp"),
        (["trainer.num_nodes=2", "trainer.strategy=single_device"], r"strategy=single_device: several nodes need DDP"),
    ],
)
def test_a_job_that_does_not_fit_the_trainer_is_named(overrides, message):
    base = ["trainer=ddp", "trainer.accelerator=cpu"] if "trainer.strategy=single_device" not in overrides else []
    problems = slurm_shape_problems(composed(*base, *overrides))
    assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_several_nodes_need_a_strategy_that_spans_them():
    with pytest.raises(SlurmResourceError, match="several nodes need DDP"):
        slurm_nodes(2, {"_target_": "lightning.pytorch.strategies.SingleDeviceStrategy"})
    assert slurm_nodes(1, "single_device") == 1  # one node: any strategy


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer=ddp", "trainer.devices=2", "hydra.launcher.tasks_per_node=1"], "tasks_per_node=1 but trainer"),
        (["trainer=ddp", "trainer.num_nodes=1,2"], "trainer.num_nodes=1,2: one SLURM array job has one shape"),
    ],
)
def test_train_py_stops_before_submitting_a_job_that_does_not_fit(tmp_path, overrides, message):
    sweep = tmp_path / "sweep"
    proc = train_py_slurm(*overrides, "trainer.accelerator=cpu", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-3000:]
    assert not (sweep / ".submitit").exists()  # nothing submitted


@pytest.fixture
def slurm_cluster(tmp_path):
    """A running SLURM cluster (any state: nothing here runs); yields a sweep folder, cancels its jobs after."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        pytest.fail(f"sbatch/scontrol not found: SLURM is not installed here; {START_CLUSTER}")
    proc = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip()
        pytest.fail(f"sinfo failed: {why}; is slurmctld running? {START_CLUSTER}")
    sweep = tmp_path / "sweep"
    yield sweep
    cancel(sweep)


def cancel(sweep: Path) -> list[str]:
    """Cancel the array jobs a test submitted (their ids name the folders under .submitit) and wait until
    SLURM no longer lists them; returns what is still listed after 20 s."""
    ids = sorted({m.group(1) for p in sweep.glob(".submitit/*") if (m := JOB_DIR.fullmatch(p.name))})
    if not ids:
        return []
    subprocess.run(["scancel", *ids], capture_output=True, timeout=30)
    deadline = time.monotonic() + 20
    while True:
        listed = subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True, timeout=30)
        left = [ln for ln in listed.stdout.splitlines() if ln.strip() and " CA " not in ln]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30, check=True)
    return dict(re.findall(r"(\S+?)=(\S*)", out.stdout))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_node_multirun_asks_slurm_for_two_nodes(slurm_cluster, data_dir):
    sweep = slurm_cluster
    args = [
        *CLI_TINY, "patch=bn,dw", "trainer=ddp", "trainer.accelerator=cpu", "trainer.num_nodes=2",
        "trainer.devices=2", "data.num_workers=1", "+hydra.launcher.additional_parameters.hold=true",
        f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}",
    ]  # fmt: skip
    # held: it could never start here anyway (one node), and a held job takes nothing from other tests' jobs
    log = sweep.parent / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", *args],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while not list(sweep.glob(".submitit/*/*_submission.sh")):
                assert driver.poll() is None, f"train.py exited ({driver.returncode}): {log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "nothing submitted after 90 s"
                time.sleep(0.5)
            (script,) = sweep.glob(".submitit/*/*_submission.sh")
            job = JOB_DIR.fullmatch(script.parent.name).group(1)
            fields = {f"{job}_{i}": job_fields(f"{job}_{i}") for i in (0, 1)}
        finally:
            left = cancel(sweep)
            driver.kill()
            driver.wait(timeout=30)
    text = script.read_text()
    for line in ("--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=2", "--array=0-1%2", "--hold"):
        assert f"#SBATCH {line}\n" in text, line
    assert "gpus-per-node" not in text and "gres" not in text
    for task, f in fields.items():
        assert f["NumNodes"].split("-")[0] == "2" and f["NumTasks"] == "4", (task, f)
        assert f["NtasksPerN:B:S:C"].split(":")[0] == "2" and f["CPUs/Task"] == "2", (task, f)
        assert f["JobState"] == "PENDING", (task, f)
    assert left == [], left  # nothing left pending
    print(f"\nsbatch asked for (job {job}):", *(ln for ln in text.splitlines() if ln.startswith("#SBATCH")), sep="\n  ")
    keys = ("NumNodes", "NumTasks", "NtasksPerN:B:S:C", "CPUs/Task", "TRES", "Reason")
    for task, f in fields.items():
        print(f"scontrol show job {task}:", " ".join(f"{k}={f[k]}" for k in keys))
