"""Sequential transfer: a task added by init_from starts from the loaded model, and its run's patch
files evaluate with eval.py."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from modelpatch.config import ConfigError
from modelpatch.run import build, train

from .support import ROOT

TWO_TASKS = [
    "task=multi",
    "task.tasks=[fmnist_b,digits]",
    "task.catalog.fmnist_b.train_size=64",
    "task.catalog.fmnist_b.val_size=64",
    "task.catalog.digits.train_size=64",
    "patch=bn+dw",
]
ADD_TASK = ["task=fmnist_a", "task.train_size=64", "task.val_size=64", "patch=bn+dw"]


@pytest.fixture(scope="module")
def trained_two_tasks(tmp_path_factory, data_dir, fashion_mnist):
    """A 2-task model trained with its shared weights (train_shared=true): a non-trivial base."""
    from .support import compose_cfg

    out = tmp_path_factory.mktemp("two_tasks")
    _, objects = train(compose_cfg([*TWO_TASKS, "patch.train_shared=true"], out, data_dir))
    return objects["trainer"].checkpoint_callback.best_model_path, objects["model"]


def patch_values(model, source):
    if source == "base":
        base = model.model.backbone
        return {**dict(base.named_parameters()), **dict(base.named_buffers())}
    return model.model.patches[source].tensors()


@pytest.mark.parametrize(("requested", "source"), [(None, "fmnist_b"), ("digits", "digits"), ("base", "base")])
def test_added_task_starts_from_the_loaded_model(make_cfg, trained_two_tasks, requested, source):
    ckpt, old = trained_two_tasks
    extra = [] if requested is None else [f"init_patch_from={requested}"]
    _, model = build(make_cfg(*ADD_TASK, f"init_from={ckpt}", *extra))
    new = model.model.patches["fmnist_a"].tensors()
    want = patch_values(model, source)
    names = list(new)
    assert any(".running_var" in n for n in names) and any(t.dim() == 4 for t in new.values())  # dw kernels
    for name in names:
        assert torch.equal(new[name], want[name]), name
    # the source is a trained one, not a fresh backbone's (running variance 1, scale 1)
    var = [n for n in names if n.endswith("running_var")]
    if source != "base":
        assert torch.equal(want[var[0]], old.model.patches[source].tensors()[var[0]])
        assert (torch.cat([want[n].flatten() for n in var]) - 1.0).abs().mean().item() > 0.05
    assert model.hparams["init_from"]["init_patch_from"] == source


def test_unknown_patch_source_names_the_loaded_tasks(make_cfg, trained_two_tasks):
    ckpt, _ = trained_two_tasks
    unknown = r"init_patch_from='cifar10' is not a task of .*; choose one of: digits, fmnist_b, or base"
    with pytest.raises(ConfigError, match=unknown):
        build(make_cfg(*ADD_TASK, f"init_from={ckpt}", "init_patch_from=cifar10"))
    with pytest.raises(ConfigError, match="set init_from too"):
        build(make_cfg(*ADD_TASK, "init_patch_from=digits"))


@pytest.mark.slow
def test_init_from_run_records_its_source_and_evaluates_with_eval_py(make_cfg, trained_two_tasks, tmp_path, data_dir):
    ckpt, _ = trained_two_tasks
    train(make_cfg(*ADD_TASK, f"init_from={ckpt}", "trainer.limit_test_batches=1.0"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["init_from"]["init_patch_from"] == "fmnist_b" and results["init_from"]["checkpoint"] == ckpt
    files = results["patch_files"]
    assert set(files) == {"base", "fmnist_a", "fmnist_b", "digits"}
    for task, path in files.items():
        if task == "base":
            continue
        with safe_open(path, framework="pt") as f:
            on_disk = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
        assert results["tasks"][task]["patch_bytes"] == on_disk, task
        assert on_disk > 4 * (results["tasks"][task]["params_patch"] + results["tasks"][task]["params_head"])
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"patches=[{files['fmnist_a']},{files['digits']}]",
         f"hydra.run.dir={out}", f"paths.data_dir={data_dir}", "trainer.accelerator=cpu",
         "trainer.enable_progress_bar=false", "extras.print_config=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((out / "eval_results.json").read_text())["tasks"]
    for task in ("fmnist_a", "digits"):
        assert evaluated[task]["test_acc"] == results["tasks"][task]["test_acc"], task


def test_default_source_follows_where_the_base_got_its_values():
    from modelpatch.training.transfer import default_patch_source

    def hp(weights, train_shared, **extra):
        return {"backbone": {"weights": weights}, "patch": {"train_shared": train_shared}, **extra}

    assert default_patch_source(hp("imagenet", False), ["a", "b"]) == "base"  # pretrained, left alone
    assert default_patch_source(hp("/runs/x/base.safetensors", False), ["a"]) == "base"
    assert default_patch_source(hp("imagenet", True), ["a", "b"]) == "a"  # trained jointly with the patches
    assert default_patch_source(hp("random", False), ["a", "b"]) == "a"
    old = {"backbone": {}, "patch": {"train_shared": False}, "meta": {"config": {"backbone": {"weights": "imagenet"}}}}
    assert default_patch_source(old, ["a"]) == "base"  # checkpoints without backbone.weights
    # a model made by init_from keeps what its own checkpoint's base was
    chained = hp("random", False, init_from={"base_weights": "random", "base_learned": False})
    assert default_patch_source(chained, ["c", "a"]) == "c"
