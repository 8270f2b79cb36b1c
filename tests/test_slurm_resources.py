"""SLURM resources that follow the run (``modelpatch.cluster.slurm``): GPUs only where the partition has them,
CPUs for the data loaders, requeues that cover the paper experiments' hours; the README's SLURM line on the
local cluster (no GPUs) as users type it. No cluster is a failure, never a skip."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from modelpatch.cluster.slurm import cpus_per_task, gres_gpus, requeues

from .support import CLI_TINY, CONF, ROOT

PAPER = sorted(p.stem for p in (CONF / "experiment" / "paper").glob("*.yaml"))


def launcher(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize(
    ("gres", "gpus"),
    [("(null)", 0), ("gpu:4", 4), ("gpu:a100:8(S:0-1)", 8), ("gpu:a100:2,gpu:v100:2", 4), ("mps:200", 0)],
)
def test_gres_gpus(gres, gpus):
    assert gres_gpus(gres) == gpus


def test_cpus_and_requeues():
    assert [cpus_per_task(n) for n in (0, None, 8)] == [1, 1, 9]
    assert requeues(None, 240) == 3 and requeues(2, 240) == 3 and requeues(40, 240) == 10


def test_cpus_per_task_follow_the_data_loaders():
    cfg = launcher("trainer.accelerator=cpu", "data.num_workers=4")
    assert cfg.hydra.launcher.cpus_per_task == 5
    setup = OmegaConf.to_container(cfg.hydra.launcher.setup, resolve=True)
    assert setup == ["export OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK - 4 > 0 ? SLURM_CPUS_PER_TASK - 4 : 1))"]


@pytest.mark.parametrize("experiment", PAPER)
def test_requeues_cover_each_paper_experiment(experiment):
    cfg = launcher(f"experiment=paper/{experiment}", "trainer.accelerator=cpu")
    attempts = cfg.hydra.launcher.max_num_timeout + 1
    assert cfg.wall_hours, f"conf/experiment/paper/{experiment}.yaml sets no wall_hours"
    # every attempt of timeout_min, one to spare for the work redone after each requeue
    assert (attempts - 1) * cfg.hydra.launcher.timeout_min >= 60 * cfg.wall_hours


def sinfo_gpus() -> int:
    if shutil.which("sinfo") is None:
        pytest.fail(
            "sinfo not found: SLURM is not installed here; start the local cluster: bash scripts/slurm-local.sh"
        )
    out = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30, check=True).stdout
    return max(gres_gpus(g) for g in out.split())


@pytest.mark.slow
def test_gpu_accelerator_on_a_partition_without_gpus_fails_before_submitting(tmp_path):
    assert sinfo_gpus() == 0, "this test needs a cluster without GPUs (the local one)"
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", "trainer=gpu", "patch=bn,dw",
         f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "the nodes of the default partition have 0" in proc.stderr and "trainer.accelerator=cpu" in proc.stderr
    assert not (sweep / ".submitit").exists()  # nothing submitted


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_readme_slurm_line_submits_no_gpu_request_on_a_cpu_cluster(slurm, data_dir):
    """``python train.py -m hydra/launcher=slurm patch=bn,bn+dw task=multi`` with the default
    ``trainer.accelerator=auto`` (shrunk to a few batches): no GRES request, both jobs run."""
    sweep = slurm
    tiny = [o for o in CLI_TINY if not o.startswith(("trainer.accelerator", "task"))]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", "patch=bn,bn+dw", "task=multi", *tiny,
         f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (script,) = (sweep / ".submitit").glob("*/*_submission.sh")
    text = script.read_text()
    assert "gpus-per-node" not in text and "gres" not in text and "#SBATCH --cpus-per-task=1" in text
    for num, patch in enumerate(["bn", "bn+dw"]):
        results = json.loads((sweep / str(num) / "results.json").read_text())
        assert results["patch"] == patch and set(results["tasks"]) == {"fmnist_a", "fmnist_b", "digits"}
        assert math.isfinite(results["test_acc"])
