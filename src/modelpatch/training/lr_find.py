"""``optim.lr=auto``: Lightning's learning-rate finder (``Tuner.lr_find``) picks the rate before training.

The finder trains from the run's starting weights for ``STEPS`` steps while the rate of every trained group
(the patch and the head, the shared weights when they train) rises together from ``MIN_LR`` to ``MAX_LR``,
then puts the weights back. The rate where the smoothed loss falls fastest against log(rate) becomes the rate
of every group (``lr``, ``patch_lr``, ``head_lr``, ``shared_lr``). Lightning's own ``suggestion()`` takes the
slope against the rate itself, which on the finder's exponential grid favours the smallest rates; it is
recorded beside. The finder runs on a Trainer of its own without validation, logging or checkpoints, so the
run's own callbacks, logs and step count start as they would without it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import lightning as L
import torch
from lightning.pytorch.tuner import Tuner, lr_finder
from omegaconf import DictConfig

from modelpatch.config import ConfigError
from modelpatch.data import TaskDataModule
from modelpatch.training.module import PatchModule
from modelpatch.training.optim import OptimConfig
from modelpatch.training.resume import read_resumable

log = logging.getLogger("modelpatch")

AUTO = "auto"
STEPS = 100
MIN_LR = 1e-6
MAX_LR = 1.0


def choose_lr(
    cfg: DictConfig, model: PatchModule, datamodule: TaskDataModule, trainer: L.Trainer, ckpt_path: str | None
) -> dict | None:
    """``optim.lr=auto``: the finder's rates (``training.lr_find``); a resumed run takes those of its checkpoint."""
    if trainer.world_size > 1:
        raise ConfigError(
            f"optim.lr=auto runs the learning-rate finder on one device, and this run has {trainer.world_size}: "
            "run it once on one device (results.json: lr_find.lr), then set optim.lr to that rate"
        )
    if ckpt_path is not None:
        model.optim = OptimConfig(**read_resumable(Path(ckpt_path))["hyper_parameters"]["optim"])
        log.info(f"optim.lr=auto: resuming with the rate the finder chose, {model.optim.patch_lr:.3g}")
        return None
    return find_lr(cfg, model, datamodule)


def find_lr(cfg: DictConfig, model: PatchModule, datamodule: TaskDataModule) -> dict[str, float | int]:
    """Run the finder, set ``model``'s rates to its suggestion, and return what it found (for results.json)."""
    chosen = model.optim
    # one rate for every group; the finder brings its own schedule
    model.optim = dataclasses.replace(
        chosen, lr=MIN_LR, patch_lr=None, head_lr=None, shared_lr=None, scheduler="constant"
    )
    # scratch: where Lightning keeps the starting weights meanwhile
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        finder_trainer = L.Trainer(
            default_root_dir=scratch,
            accelerator=cfg.trainer.get("accelerator", "auto"),
            devices=1,
            precision=cfg.trainer.get("precision", "32-true"),
            max_epochs=-1,
            max_steps=STEPS,
            check_val_every_n_epoch=None,
            val_check_interval=10**9,  # never: the finder's steps are all training
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        quiet = mock.patch.object(lr_finder, "tqdm", functools.partial(lr_finder.tqdm, disable=True))
        with quiet:  # the finder's own progress bar: the run logs its choice instead
            result = Tuner(finder_trainer).lr_find(
                model, datamodule=datamodule, min_lr=MIN_LR, max_lr=MAX_LR, num_training=STEPS, update_attr=False
            )
    lrs, losses = result.results["lr"], result.results["loss"]
    rate = steepest_fall(lrs, losses)
    if rate is None:
        raise RuntimeError(
            f"optim.lr=auto: the learning-rate finder made no suggestion from {len(lrs)} steps "
            "(too few training batches, or a loss that diverged at once); set optim.lr to a number"
        )
    model.optim = dataclasses.replace(chosen, lr=rate, patch_lr=rate, head_lr=rate, shared_lr=rate)
    model.hparams["optim"] = dataclasses.asdict(model.optim)
    log.info(f"optim.lr=auto: the learning-rate finder chose {rate:.3g} after {len(lrs)} steps")
    return {
        "lr": rate,
        "lightning_suggestion": result.suggestion(),
        "steps": len(lrs),
        "min_lr": MIN_LR,
        "max_lr": MAX_LR,
    }


def steepest_fall(lrs: list[float], losses: list[float], skip_begin: int = 10, skip_end: int = 1) -> float | None:
    """The rate where the loss falls fastest against log(rate), leaving out the first ``skip_begin`` and last
    ``skip_end`` points (as Lightning's ``suggestion``); ``None`` with fewer than 3 finite points."""
    lr = torch.tensor(lrs[skip_begin : len(lrs) - skip_end], dtype=torch.float64)
    loss = torch.tensor(losses[skip_begin : len(losses) - skip_end], dtype=torch.float64)
    finite = torch.isfinite(loss)
    lr, loss = lr[finite], loss[finite]
    if len(loss) < 3:
        return None
    slope = torch.gradient(loss, spacing=(lr.log(),))[0]
    return float(lr[slope.argmin()])
