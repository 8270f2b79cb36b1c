"""SLURM through the real command line, on the single-node cluster ``scripts/slurm-local.sh`` starts:
a two-job multirun, and a job that is preempted, requeued by submitit and resumed from its checkpoint.

No cluster is a failure, never a skip. The tiny runs use ``trainer.accelerator=cpu``, for which the
``hydra/launcher=slurm`` config requests no GPUs (``${mp.gpus_per_node:...}``), so no override is needed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf.errors import InterpolationResolutionError

import modelpatch.resolvers  # noqa: F401  (registers the mp.* resolvers the launcher configs use)
from modelpatch.resolvers import wandb_run_id

from .faults import run_state
from .support import CLI_TINY, CONF, ROOT, train_py_slurm
from .wandb_offline import read_offline_run


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_multirun_on_slurm_runs_both_jobs(slurm, data_dir):
    sweep = slurm
    proc = train_py_slurm(*CLI_TINY, "patch=logits,bn", f"hydra.sweep.dir={sweep}", f"paths.data_dir={data_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CheckSweepChoices.on_multirun_start raised" not in proc.stderr  # the sweep check ran
    for num, patch in enumerate(["logits", "bn"]):
        results = json.loads((sweep / str(num) / "results.json").read_text())
        assert results["patch"] == patch and results["tasks"]["digits"]["test_acc"] is not None
        # the job ran inside SLURM, where submitit (not Lightning) owns requeue
        assert "submitit requeues it" in (sweep / str(num) / "train.log").read_text()
    (script,) = (sweep / ".submitit").glob("*/*_submission.sh")
    text = script.read_text()
    assert "#SBATCH --array=0-1%2" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "gpus-per-node" not in text and "#SBATCH --signal=USR2@120" in text


def wait_for(path: Path, driver: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if driver.poll() is not None:
            pytest.fail(f"train.py exited ({driver.returncode}) before {path} was written")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path} after {timeout:.0f}s")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_preempted_job_is_requeued_by_submitit_and_resumes_to_the_same_step(slurm, tmp_path, data_dir, wandb_env):
    """Job 0 gets submitit's signal (SIGUSR2, as before a time limit or on preemption) after its first
    checkpoint; submitit requeues it, and the new attempt resumes from last.ckpt and continues its W&B run
    (offline: both attempts under the same run id). Job 1, the same run (same seed), runs undisturbed: both end
    with the same weights, optimizer, patches, accuracies and metrics.csv rows (tests/faults.py)."""
    sweep = slurm
    epochs, steps_per_epoch = 4, 3
    replaced = ("trainer.max_epochs", "trainer.limit_train_batches")
    args = [o for o in CLI_TINY if o.lstrip("+").split("=")[0] not in replaced]
    args += [
        f"trainer.max_epochs={epochs}",
        f"++trainer.limit_train_batches={steps_per_epoch}",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "+callbacks.pace._target_=tests.pace.Pace",
        "+callbacks.pace.seconds_per_step=0.5",
        "+callbacks.pace.out=${paths.output_dir}",
        "seed=0,0",  # twins
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={data_dir}",
    ]
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(sweep / "0" / "checkpoints" / "last.ckpt", driver, timeout=240)
            (job,) = [p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_0", p.name)]
            subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
            driver.wait(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
    assert driver.returncode == 0, log.read_text()[-3000:]
    assert "CheckSweepChoices.on_multirun_start raised" not in log.read_text()

    total = epochs * steps_per_epoch
    starts = [int(s) for s in (sweep / "0" / "starts.txt").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < total, starts  # resumed mid-training
    assert [int(s) for s in (sweep / "1" / "starts.txt").read_text().split()] == [0]
    train_log = (sweep / "0" / "train.log").read_text()
    assert "Requeued job" in train_log and "resuming from" in train_log
    for num in (0, 1):
        ckpt = torch.load(sweep / str(num) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == total, (num, ckpt["global_step"])
        assert json.loads((sweep / str(num) / "results.json").read_text())["test_acc"] is not None
    requeued, undisturbed = run_state(sweep / "0"), run_state(sweep / "1")
    for key in ("last", "best", "patches", "accuracies", "metrics"):
        assert requeued[key] == undisturbed[key], key
    attempts = {num: sorted((sweep / str(num) / "wandb").glob("offline-run-*")) for num in (0, 1)}
    ids = {num: [p.name.rsplit("-", 1)[1] for p in runs] for num, runs in attempts.items()}
    assert ids == {0: [wandb_run_id(str(sweep / "0"))] * 2, 1: [wandb_run_id(str(sweep / "1"))]}, ids
    steps = [[r["trainer/global_step"] for r in read_offline_run(p).history if "val/acc" in r] for p in attempts[0]]
    # the second attempt logs on from the resumed step (the first may have been stopped before validating),
    # then the best checkpoint re-validated after training (at the final step)
    assert steps[1] and min(steps[1]) > 0 and max(steps[0], default=-1) < min(steps[1])
    assert max(steps[1][:-1]) == total - 1 and steps[1][-1] == total, steps


def launcher_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True).hydra.launcher


@pytest.mark.parametrize(
    ("overrides", "tasks", "gpus"),
    [
        (["trainer.accelerator=cpu"], 1, None),
        (["trainer=ddp", "trainer.devices=4"], 4, None),  # accelerator auto: the local cluster has no GPUs
        (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=[0,1]"], 2, None),
        (["trainer=gpu", "hydra.launcher.gpus_per_node=1"], 1, 1),  # set by hand: taken as it is
    ],
)
def test_slurm_resources_follow_the_trainer(overrides, tasks, gpus):
    launcher = launcher_cfg("hydra/launcher=slurm", *overrides)
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == tasks and launcher.gpus_per_node == gpus
    GlobalHydra.instance().clear()


def test_slurm_launcher_refuses_devices_it_cannot_count():
    launcher = launcher_cfg("hydra/launcher=slurm", "trainer.devices=auto")
    with pytest.raises(InterpolationResolutionError, match=r"trainer.devices='auto'.*trainer.devices=2"):
        _ = launcher.tasks_per_node
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(("option", "target"), [("local", "LocalLauncher"), ("serial", "BasicLauncher")])
def test_other_launchers_compose(option, target):
    assert launcher_cfg(f"hydra/launcher={option}")._target_.endswith(target)
    GlobalHydra.instance().clear()
