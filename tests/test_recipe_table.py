"""scripts/recipe_table.py: the recipe study's tables from run folders as train.py writes them (resolved
config.yaml beside results.json), seeds averaged, the best recipe chosen by validation accuracy."""

from __future__ import annotations

import json

import yaml

from scripts.recipe_table import OLD, chosen, default_recipe, gather, plot, tables


def write_run(
    folder,
    kind,
    size,
    seed,
    test,
    val,
    *,
    name="sgd",
    lr=0.3,
    patch_lr=None,
    head_lr=None,
    min_steps=300,
    backbone=None,
    warmup=None,
):
    folder.mkdir(parents=True)
    config = {
        "task": {"name": "fmnist_b", "train_size": size},
        "optim": {"name": name, "lr": lr, "patch_lr": patch_lr, "head_lr": head_lr, "warmup_epochs": warmup},
        "trainer": {"min_steps": min_steps, "max_epochs": 8},
    }
    if backbone:
        config["backbone"] = {"name": backbone}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    params = {"logits": 6_405, "bn": 40_805}.get(kind, 100_000)
    task = {"test_acc": test, "val_acc": val, "params_patch": params - 6_405, "params_head": 6_405}
    result = {"patch": kind, "seed": seed, "test_acc": test, "val_acc": val, "tasks": {"fmnist_b": task}}
    (folder / "results.json").write_text(json.dumps(result))


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
    write_run(tmp_path / "r18" / "0", "bn", 250, 0, 0.99, 0.99, backbone="resnet18")  # another backbone's table
    # optim.lr=auto: its own column, never the best swept, though its validation accuracy is the highest
    write_run(tmp_path / "auto" / "0", "bn", 250, 0, 0.90, 0.95, lr="auto")
    result = json.loads((tmp_path / "auto" / "0" / "results.json").read_text())
    (tmp_path / "auto" / "0" / "results.json").write_text(json.dumps({**result, "lr_find": {"lr": 0.042}}))
    groups = gather(tmp_path)
    assert len(groups[(250, "bn", OLD)]["test"]) == 2
    text = tables(groups)
    row = next(line for line in text.splitlines() if line.startswith("| bn |"))
    assert row == (
        "| bn | 0.7100 ± 0.0141 (2) | 0.8500 ± 0.0000 (3) | 0.8400 (1 seed) | rmsprop 0.001, 8 ep, >= 300 steps "
        "| +1.0 | 4 | 0.9000 (1 seed) at 0.042 |"
    )
    assert "**1,000 training images**" in text
    assert [g["test"] for g in gather(tmp_path, "resnet18").values()] == [[0.99]]


def test_the_plot_draws_each_size_from_the_chosen_recipes(tmp_path):
    runs = tmp_path / "runs"
    new = default_recipe("logits")
    write_run(runs / "old", "logits", 250, 0, 0.55, 0.56, lr=0.05, patch_lr=0.1, min_steps=0)
    write_run(runs / "new", "logits", 250, 0, 0.80, 0.80, lr=new[1], min_steps=new[3])
    write_run(runs / "hi", "logits", 250, 0, 0.81, 0.82, lr=1.0)
    write_run(runs / "k", "logits", 1000, 0, 0.83, 0.83, lr=new[1], min_steps=new[3])
    groups = gather(runs)
    mine = {r: g for (size, kind, r), g in groups.items() if size == 250}
    assert chosen(mine) == {"before the study": OLD, "defaults now": new, "best swept": ("sgd", 1.0, 1.0, 300, 8, 0.0)}
    plot(groups, tmp_path / "recipes.png")
    assert (tmp_path / "recipes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes.png", "runs"]  # nothing half-written beside it


def test_a_recipe_and_seed_run_twice_counts_once(tmp_path, capsys):
    write_run(tmp_path / "a" / "0", "bn", 250, 0, 0.85, 0.84)
    write_run(tmp_path / "b" / "0", "bn", 250, 0, 0.85, 0.84)  # the same run again, as another stage repeats it
    write_run(tmp_path / "b" / "1", "bn", 250, 1, 0.83, 0.82)
    write_run(tmp_path / "c" / "0", "bn", 250, 0, 0.80, 0.79)  # a repeat that reached another accuracy
    write_run(tmp_path / "d" / "0", "bn", 250, 0, 0.86, 0.85, warmup=1)  # another recipe: a warmup epoch
    g, warm = gather(tmp_path).values()
    assert warm["runs"] == ["d/0"] and "warmup 1 ep" in tables(gather(tmp_path))
    assert (g["test"], g["seeds"], g["runs"]) == ([0.85, 0.83], [0, 1], ["a/0", "b/1"])
    err = capsys.readouterr().err
    assert "c/0 repeats a/0 (seed 0) with test accuracy 0.8000, not 0.8500" in err and "b/0" not in err
