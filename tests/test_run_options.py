"""Run options through train.py's command line and the composed config: the Trainer keys users reach
for (no ``+`` needed), progress without a terminal, a quiet console, ``compile`` and bf16 mixed precision."""

import json
import shutil

import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar

from modelpatch.run import train
from modelpatch.training.console import ProgressLines, progress_bar

from .support import CLI_TINY, train_py

DIGITS = ["task=digits", "task.train_size=200"]
SHRINK_KEYS = ("trainer.max_epochs", "trainer.limit_", "trainer.enable_progress_bar")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data_dir):
    """One train.py run with the Trainer keys set without ``+``, a progress bar asked for, and no terminal."""
    out = tmp_path_factory.mktemp("options") / "run"
    args = [o for o in CLI_TINY if not o.lstrip("+").startswith(SHRINK_KEYS)]
    proc = train_py(
        *args, "trainer.max_epochs=3", "trainer.max_steps=5", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.limit_predict_batches=1",
        "trainer.val_check_interval=1.0", "trainer.accumulate_grad_batches=1", "trainer.gradient_clip_val=1.0",
        "trainer.precision=32-true", "trainer.num_nodes=1", "trainer.enable_progress_bar=true",
        f"hydra.run.dir={out}", f"paths.data_dir={data_dir}",
    )  # fmt: skip
    return proc, out


@pytest.mark.slow
def test_trainer_keys_need_no_plus(plain_run):
    proc, out = plain_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=5` reached." in proc.stdout + proc.stderr  # in epoch 2 of 3
    config = (out / "config.yaml").read_text()
    assert "max_steps: 5" in config and "gradient_clip_val: 1.0" in config


@pytest.mark.slow
def test_run_without_a_terminal_prints_progress_lines_not_a_bar(plain_run):
    proc, out = plain_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stdout + proc.stderr
    assert "epoch 1/3 done in" in proc.stdout and "(step 3): " in proc.stdout and "val/acc" in proc.stdout
    assert "epoch 2/3 done in" in proc.stdout and "(step 5)" in proc.stdout
    assert "epoch 2/3 done in" in (out / "train.log").read_text()


@pytest.mark.slow
def test_console_has_no_lightning_ads_or_deprecation_warnings(plain_run):
    proc, _ = plain_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "Tip:" not in text and "litlogger" not in text and "litmodels" not in text
    assert "LeafSpec" not in text and "is deprecated" not in text
    assert shutil.which("srun") and "srun" not in text  # this machine has SLURM: Lightning would hint at srun


def test_compile_trains_with_unchanged_checkpoint_keys(make_cfg, tmp_path):
    cfg = make_cfg(*DIGITS, "patch=bn", "compile=eager", "trainer.max_epochs=1")
    metrics, objects = train(cfg)
    assert metrics["test/digits/acc"] >= 0.0
    assert hasattr(objects["model"].model, "_compiled_call_impl") and objects["model"].model._compiled_call_impl
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_acc"] is not None


def test_unknown_compile_backend_fails_before_reading_data(make_cfg):
    cfg = make_cfg(*DIGITS, "compile=inductr", "data.root=/nonexistent")
    with pytest.raises(ValueError, match=r"compile='inductr' is not a torch.compile backend.*inductor"):
        train(cfg)


def test_bf16_trainer_config_trains(make_cfg):
    cfg = make_cfg(*DIGITS, "trainer=gpu_bf16", "trainer.accelerator=cpu", "patch=bn")
    metrics, objects = train(cfg)
    assert objects["trainer"].precision == "bf16-mixed" and metrics["test/digits/acc"] >= 0.0


def test_progress_bar_choice():
    assert progress_bar(enabled=False) is None
    assert isinstance(progress_bar(lines=True), ProgressLines)
    assert isinstance(progress_bar(lines=False), RichProgressBar)
    with pytest.raises(ValueError, match=r"lines='sometimes'; choose auto, true or false"):
        progress_bar(lines="sometimes")
