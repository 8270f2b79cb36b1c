"""scripts/recipe_table.py: the recipe study's tables from run folders as train.py writes them (resolved
config.yaml beside results.json), seeds averaged, the best recipe chosen by validation accuracy."""

from __future__ import annotations

import json

import yaml

from scripts.recipe_table import OLD, default_recipe, gather, tables


def write_run(folder, kind, size, seed, test, val, *, name="sgd", lr=0.3, patch_lr=None, head_lr=None, min_steps=300):
    folder.mkdir(parents=True)
    config = {
        "task": {"name": "fmnist_b", "train_size": size},
        "optim": {"name": name, "lr": lr, "patch_lr": patch_lr, "head_lr": head_lr},
        "trainer": {"min_steps": min_steps, "max_epochs": 8},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "results.json").write_text(json.dumps({"patch": kind, "seed": seed, "test_acc": test, "val_acc": val}))


def test_old_new_and_best_side_by_side(tmp_path):
    new = default_recipe("bn")
    assert new[0] == "sgd" and new[3] > 0  # the defaults: SGD, a step floor
    for seed, (test, val) in enumerate([(0.70, 0.71), (0.72, 0.73)]):  # the old defaults, 2 seeds
        write_run(tmp_path / "old" / str(seed), "bn", 250, seed, test, val, lr=0.05, patch_lr=0.1, min_steps=0)
    for seed in range(3):  # the new defaults
        write_run(tmp_path / "new" / str(seed), "bn", 250, seed, 0.85, 0.84, lr=new[1], min_steps=new[3])
    # best by validation (0.86), though its test accuracy is lower than another's
    write_run(tmp_path / "sweep" / "0", "bn", 250, 0, 0.84, 0.86, name="rmsprop", lr=0.001)
    write_run(tmp_path / "sweep" / "1", "bn", 250, 0, 0.88, 0.80, name="adam", lr=0.01)
    write_run(tmp_path / "other" / "0", "bn", 1000, 0, 0.91, 0.91)
    # optim.lr=auto: its own column, never the best swept, though its validation accuracy is the highest
    write_run(tmp_path / "auto" / "0", "bn", 250, 0, 0.90, 0.95, lr="auto")
    result = json.loads((tmp_path / "auto" / "0" / "results.json").read_text())
    (tmp_path / "auto" / "0" / "results.json").write_text(json.dumps({**result, "lr_find": {"lr": 0.042}}))
    groups = gather(tmp_path)
    assert len(groups[(250, "bn", OLD)]["test"]) == 2
    text = tables(groups)
    row = next(line for line in text.splitlines() if line.startswith("| bn |"))
    assert row == (
        "| bn | 0.7100 ± 0.0141 (2) | 0.8500 ± 0.0000 (3) | 0.8400 (1 seed) | rmsprop 0.001, 8 ep, >= 300 steps | 4 "
        "| 0.9000 (1 seed) at 0.042 |"
    )
    assert "**1,000 training images**" in text
