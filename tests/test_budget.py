"""The training budget: ``trainer.min_steps`` lengthens an epoch budget too short for a small task, validates
as often as ``max_epochs`` asked, ends on a validation, and leaves ``max_steps`` budgets alone."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import Callback

from modelpatch.run import train
from modelpatch.training.budget import limited_batches, repeats_for_min_steps

from .support import DIGITS


@pytest.mark.parametrize(
    ("max_epochs", "epoch_steps", "min_steps", "repeats"),
    [(8, 2, 300, 19), (8, 8, 300, 5), (8, 40, 300, 1), (8, 2, 0, 1), (8, 2, 16, 1), (8, 2, 17, 2), (0, 2, 300, 1)],
)
def test_each_epoch_repeats_until_min_steps(max_epochs, epoch_steps, min_steps, repeats):
    got = repeats_for_min_steps(max_epochs, epoch_steps, min_steps)
    assert got == repeats
    assert got == 1 or (got - 1) * max_epochs * epoch_steps < min_steps <= got * max_epochs * epoch_steps


@pytest.mark.parametrize(("limit", "batches"), [(None, 13), (5, 5), (50, 13), (0.5, 6), (0.01, 1), (0.0, 0)])
def test_limited_batches_follows_lightnings_rule(limit, batches):
    assert limited_batches(13, limit) == batches


class CountValidations(Callback):
    """Records the step of every validation while fitting (``+callbacks.count._target_=``)."""

    def __init__(self):
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # not run.py's validation of the best
            self.steps.append(trainer.global_step)


def test_a_small_task_trains_min_steps_and_validates_as_often_as_max_epochs_say(make_cfg):
    # 3 steps an epoch (limit_train_batches=3), 2 epochs: 6 steps; min_steps=14 runs each epoch 3 times
    count = f"+callbacks.count._target_={__name__}.CountValidations"
    cfg = make_cfg(*DIGITS, "test=false", "trainer.max_epochs=2", "trainer.min_steps=14", count)
    _, objects = train(cfg)
    trainer = objects["trainer"]
    (steps,) = [c.steps for c in trainer.callbacks if isinstance(c, CountValidations)]
    assert trainer.global_step == 18 and trainer.current_epoch == 6
    assert steps == [9, 18]  # two validations, the last at the end of training


def test_min_steps_leaves_a_step_budget_and_a_long_enough_one_alone(make_cfg):
    for overrides, global_step in (
        (["trainer.max_epochs=2", "trainer.max_steps=4"], 4),
        (["trainer.max_epochs=5"], 15),
    ):
        cfg = make_cfg(*DIGITS, "test=false", "trainer.min_steps=14", *overrides, out="_".join(overrides))
        _, objects = train(cfg)
        assert objects["trainer"].global_step == global_step, overrides


def test_debug_runs_its_few_batches_only(tmp_path):
    from modelpatch.config import compose_run_config

    from .support import CONF

    cfg = compose_run_config(["debug=default"], tmp_path / "run", tmp_path / "data", config_dir=CONF)
    t = cfg.trainer
    assert repeats_for_min_steps(t.max_epochs, t.limit_train_batches, t.min_steps) == 1
