"""Training through the real Hydra config and the real Lightning Trainer, tiny and on CPU."""

import json
import math

import pytest
import torch
from omegaconf import open_dict

from modelpatch.config import ConfigError
from modelpatch.data import DatasetMissingError, TaskError
from modelpatch.models.backbones import BackboneError
from modelpatch.models.memory import LeanConv2d
from modelpatch.models.patches import PatchError
from modelpatch.run import build, train
from modelpatch.training.optim import warmup_cosine

from .support import DIGITS, assert_close_scaled


@pytest.mark.parametrize("patch", ["logits", "bn", "dw", "bias", "bn+dw", "full"])
def test_each_patch_trains_and_writes_results(make_cfg, patch, tmp_path):
    cfg = make_cfg(*DIGITS, f"patch={patch}")
    metrics, objects = train(cfg)
    model = objects["model"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["patch"] == patch
    task = results["tasks"]["digits"]
    assert 0.0 <= task["test_acc"] <= 1.0 and task["test_acc"] == metrics["test/digits/acc"]
    assert task["num_classes"] == 10 and task["params_head"] == model.model.backbone.num_features * 10 + 10
    counts = results["params"]
    assert counts["trainable"] == task["params_patch"] + task["params_head"]
    assert counts["total"] == counts["shared"] + task["params_patch"] + task["params_head"]
    assert results["backbone"] == {"name": "mobilenet_v2", "width": 0.25, "features": 1280, "weights": "random"}
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(("patch", "norm_stats"), [("logits", "frozen"), ("bn", "task"), ("dw", "frozen")])
def test_frozen_weights_and_statistics_are_bit_for_bit_unchanged(make_cfg, patch, norm_stats):
    cfg = make_cfg(
        *DIGITS,
        f"patch={patch}",
        f"patch.norm_stats={norm_stats}",
        "test=false",
        "callbacks=none",
        "data.cache_features=false",
    )
    datamodule, model = build(cfg)
    backbone_before = snapshot(model.model.backbone)
    patch_before = snapshot(model.model.patches)
    with open_dict(cfg):
        cfg.trainer.max_epochs = 2
    from modelpatch import run

    trainer = run.hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    trainer.fit(model, datamodule=datamodule)
    for name, tensor in snapshot(model.model.backbone).items():
        assert torch.equal(tensor, backbone_before[name]), name
    changed = [k for k, v in snapshot(model.model.patches).items() if not torch.equal(v, patch_before[k])]
    patch_params = {k for k, _ in model.model.patches.named_parameters()}
    if norm_stats == "task":
        assert patch_params <= set(changed)  # every patch parameter trained
    else:  # frozen random statistics can saturate a ReLU6 and starve a layer of gradient
        assert len(patch_params & set(changed)) >= 0.8 * len(patch_params)
    owns_stats = any(k.endswith("running_mean") for k in patch_before)
    assert owns_stats == (norm_stats == "task")
    if owns_stats:
        assert any(k.endswith("running_mean") for k in changed)


def test_pretrain_checkpoint_loads_as_backbone_weights(make_cfg, tmp_path):
    _, objects = train(make_cfg(*DIGITS, "patch=full", out="pretrain"))
    learned = objects["model"].model.patches["digits"].tensors()
    ckpt = tmp_path / "pretrain" / "checkpoints" / "last.ckpt"
    _, model = build(make_cfg("task=fmnist_b", "task.train_size=100", "patch=bn", f"backbone.weights={ckpt}"))
    backbone = dict(model.model.backbone.body.named_parameters())
    for name, tensor in learned.items():
        if name.endswith("num_batches_tracked"):
            continue
        key = name.removeprefix("body.")
        ref = backbone.get(key, dict(model.model.backbone.body.named_buffers()).get(key))
        assert torch.equal(ref, tensor), name
    assert model.model.backbone.weights_source == str(ckpt)


def test_checkpoint_for_another_architecture_fails_before_training(make_cfg, tmp_path):
    train(make_cfg(*DIGITS, "patch=full", out="pretrain"))
    ckpt = tmp_path / "pretrain" / "checkpoints" / "last.ckpt"
    cfg = make_cfg(*DIGITS, "backbone=resnet18", "backbone.width=1.0", f"backbone.weights={ckpt}")
    with pytest.raises(BackboneError, match="does not fit backbone resnet18"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["patch.kind=bnn"], PatchError, "unknown patch kind 'bnn'"),
        (["backbone=resnet18", "backbone.width=1.0", "patch=dw"], PatchError, "'dw' selects nothing on resnet18"),
        (["backbone.name=vgg"], ConfigError, "unknown backbone 'vgg'"),
        (
            ["task=fmnist", "data.fashion_mnist_dir=/nonexistent", "data.root=/nonexistent/data"],
            DatasetMissingError,
            "apt-get install",
        ),
        (["task.name=eval"], TaskError, "'eval' cannot be used"),
    ],
)
def test_bad_input_fails_before_training(make_cfg, tmp_path, overrides, error, message):
    cfg = make_cfg(*DIGITS, *overrides)
    with pytest.raises(error, match=message):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_resumes_from_its_last_checkpoint(make_cfg, tmp_path):
    # written with every memory saver (lean_backward's default before it was auto), resumed under the default:
    # the savers change no gradient, so they may change on resume
    train(make_cfg(*DIGITS, "patch=bn", "lean_backward=true"))
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    cfg = make_cfg(*DIGITS, "patch=bn", "trainer.max_epochs=2")
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 2 * first["global_step"]


def test_cached_features_train_the_head_like_images(make_cfg):
    heads = {}
    for cache in ("true", "false"):
        cfg = make_cfg(*DIGITS, "patch=logits", f"data.cache_features={cache}", "test=false", "callbacks=none")
        _, objects = train(cfg)
        model = objects["model"]
        assert model.inputs_are_features == (cache == "true")
        heads[cache] = model.heads["digits"].weight.detach()
    assert_close_scaled(heads["true"], heads["false"], rtol=1e-4)


def test_caching_refuses_a_backbone_that_trains(make_cfg):
    with pytest.raises(ValueError, match=r"only for a fixed backbone.*patch=bn"):
        build(make_cfg(*DIGITS, "patch=bn", "data.cache_features=true"))


def test_callbacks_none_writes_no_checkpoint(make_cfg, tmp_path):
    metrics, objects = train(make_cfg("task=digits", "task.train_size=64", "callbacks=none"))
    assert objects["trainer"].checkpoint_callback is None and "test/acc" in metrics
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_channels_last_is_the_default_and_computes_the_same(make_cfg):
    _, model = build(make_cfg("task=digits", "task.train_size=64"))
    _, plain = build(make_cfg("task=digits", "task.train_size=64", "channels_last=false", out="plain"))
    plain.load_state_dict(model.state_dict())
    conv = next(m for m in model.model.backbone.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    assert model.prepare(images).is_contiguous(memory_format=torch.channels_last)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert_close_scaled(model(images, "digits"), plain(images, "digits"), rtol=1e-4)


def test_lean_backward_trains_from_the_command_line_config(make_cfg, tmp_path):
    _, objects = train(make_cfg("task=digits", "task.train_size=64", "patch=bn", "lean_backward=true"))
    convs = [m for m in objects["model"].model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, LeanConv2d) for m in convs)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["tasks"]["digits"]["test_acc"] is not None


def _closed_form(step: int, warmup: int, total: int) -> float:
    """The schedule as written before torch's schedulers did it: linear warmup, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (0, 100), (1, 10), (5, 50), (10, 10), (12, 10)])
def test_warmup_cosine_gives_the_closed_form_learning_rates(warmup, total):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (0.1, 0.02)]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    scheduler = warmup_cosine(optimizer, warmup, total)
    for step in range(total + 1):
        for group, base in zip(optimizer.param_groups, (0.1, 0.02), strict=True):
            assert group["lr"] == pytest.approx(base * _closed_form(step, warmup, total), rel=1e-12, abs=1e-15), step
        optimizer.step()
        scheduler.step()
