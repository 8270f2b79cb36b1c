"""Bad input: every case of ``scripts/errors_doc.py`` fails early with its message (and docs/errors.md is
their table); inputs that are handled (a last batch of one, a zero learning rate, warmup under max_steps,
resuming under other options) do what they say, through the real Trainer."""

from __future__ import annotations

import itertools

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from modelpatch.config import ConfigError
from modelpatch.run import train
from scripts.errors_doc import CASES, run_case, table

from .support import DIGITS, ROOT


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c.overrides) or c.note for c in CASES])
def test_bad_input_is_refused_before_any_data_is_read(case, tmp_path):
    kind, message = run_case(case, tmp_path)
    assert kind not in ("", "DataWouldBeRead"), message
    assert case.expect in message, message
    assert "Please file an issue" not in message


def test_errors_doc_is_the_generated_table():
    doc = ROOT / "docs" / "errors.md"
    assert doc.read_text() == table(), "regenerate: python scripts/errors_doc.py > docs/errors.md"


def test_a_last_batch_of_one_is_dropped(make_cfg):
    # 129 images at batch 128: the second batch would hold one image, which BatchNorm cannot train on
    cfg = make_cfg("task=digits", "task.train_size=129", "data.batch_size=128", "callbacks=none", "test=false")
    _, objects = train(cfg)
    assert objects["trainer"].num_training_batches == 1 and objects["trainer"].global_step == 1


class RecordRates(Callback):
    """Keeps the patch group's learning rate at every training step (``+callbacks.rates._target_=``)."""

    def __init__(self):
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        group = next(g for g in trainer.optimizers[0].param_groups if g["name"] == "patch")
        self.rates.append(group["lr"])


def test_warmup_counts_the_steps_of_a_real_epoch_under_max_steps(make_cfg):
    # 3 steps per epoch (limit_train_batches=3), max_steps=12 of max_epochs=10: one warmup epoch is 3 steps
    cfg = make_cfg(
        *DIGITS, "test=false", "optim.warmup_epochs=1", "trainer.max_epochs=10", "trainer.max_steps=12",
        f"+callbacks.rates._target_={__name__}.RecordRates",
    )  # fmt: skip
    _, objects = train(cfg)
    (rates,) = [c.rates for c in objects["trainer"].callbacks if isinstance(c, RecordRates)]
    assert objects["trainer"].global_step == 12 and len(rates) == 12
    base = cfg.optim.lr if cfg.optim.patch_lr is None else cfg.optim.patch_lr  # the patch kind's rate
    assert rates[:3] == pytest.approx([base / 3, 2 * base / 3, base])
    assert rates[3] == pytest.approx(base) and all(a > b for a, b in itertools.pairwise(rates[3:]))


def test_a_zero_patch_learning_rate_is_honoured(make_cfg):
    cfg = make_cfg(*DIGITS, "patch=bn", "optim.patch_lr=0.0", "callbacks=none", "test=false")
    from modelpatch.run import build

    _, before = build(cfg)
    _, objects = train(cfg)
    model = objects["model"]
    for name, p in model.model.patches.named_parameters():
        assert torch.equal(p, dict(before.model.patches.named_parameters())[name]), name
    assert not torch.equal(model.heads["digits"].weight, before.heads["digits"].weight)  # the head trained


def test_resuming_under_other_options_names_them_and_resume_false_starts_afresh(make_cfg, tmp_path):
    train(make_cfg(*DIGITS, "patch=bn"))
    with pytest.raises(ConfigError, match=r"optim\.lr=0\.05 in the checkpoint, 0\.2 now.*resume=false"):
        train(make_cfg(*DIGITS, "patch=bn", "optim.lr=0.2", "trainer.max_epochs=2"))
    _, objects = train(make_cfg(*DIGITS, "patch=bn", "optim.lr=0.2", "trainer.max_epochs=2", "resume=false"))
    assert objects["trainer"].global_step == 6  # 2 epochs of 3 steps from the start, not 1 resumed
    # the same options (more epochs) still resume
    _, objects = train(make_cfg(*DIGITS, "patch=bn", "optim.lr=0.2", "trainer.max_epochs=3"))
    assert objects["trainer"].global_step == 9
