"""The patch vocabulary: what each kind selects, composition, errors, per-task copies."""

import itertools

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.modules.batchnorm import _BatchNorm

from modelpatch.backbones import build_backbone
from modelpatch.module import PatchModule, TaskHead
from modelpatch.patches import (
    PatchedBackbone,
    PatchError,
    is_depthwise,
    parse_kind,
    resolve_patch,
)


def numel(model: nn.Module, names) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def test_mobilenet_v2_patch_sizes_match_the_paper():
    backbone = build_backbone("mobilenet_v2", width=1.0)
    assert numel(backbone, resolve_patch(backbone, "bn").params) == 34_112
    assert numel(backbone, resolve_patch(backbone, "dw").params) == 64_224
    assert numel(backbone, resolve_patch(backbone, "bn+dw").params) == 34_112 + 64_224
    assert resolve_patch(backbone, "logits").params == ()
    assert numel(backbone, resolve_patch(backbone, "full").params) == sum(p.numel() for p in backbone.parameters())


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "convnext_tiny", "efficientnet_b0"])
def test_each_kind_selects_the_right_layers(name):
    backbone = build_backbone(name, width=0.25 if name == "mobilenet_v2" else 1.0)
    modules = dict(backbone.named_modules())
    owner = {n: modules[n.rpartition(".")[0]] for n, _ in backbone.named_parameters()}
    bn = resolve_patch(backbone, "bn").params
    assert bn and all(isinstance(owner[n], (_BatchNorm, nn.GroupNorm, nn.LayerNorm)) for n in bn)
    norm_params = {n for n, m in owner.items() if isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm))}
    assert set(bn) == norm_params
    bias = resolve_patch(backbone, "bias").params
    assert bias and all(n.endswith(".bias") for n in bias)
    if name == "resnet18":
        return
    dw = resolve_patch(backbone, "dw").params
    assert dw and all(is_depthwise(owner[n]) for n in dw)
    assert set(resolve_patch(backbone, "bn+dw").params) == set(bn) | set(dw)


def test_convnext_bn_patch_is_its_layernorms():
    backbone = build_backbone("convnext_tiny")
    assert not any(isinstance(m, _BatchNorm) for m in backbone.modules())
    patch = resolve_patch(backbone, "bn")
    assert len(patch.params) > 0 and patch.buffers == ()


def test_a_patch_that_selects_nothing_names_backbone_and_alternatives():
    backbone = build_backbone("resnet18")
    with pytest.raises(PatchError, match=r"'dw' selects nothing on resnet18.*depthwise.*bias, bn, full, logits"):
        resolve_patch(backbone, "bn+dw", model_name="resnet18")


@pytest.mark.parametrize("kind", ["bnn", "bn+foo", "", "bn+"])
def test_unknown_kinds_are_refused_with_the_valid_ones(kind):
    with pytest.raises(PatchError, match="kinds: bias, bn, dw, full, logits"):
        parse_kind(kind)


def test_repeated_kind_and_bad_norm_stats():
    backbone = build_backbone("mobilenet_v2", width=0.25)
    with pytest.raises(PatchError, match="twice"):
        parse_kind("bn+bn")
    with pytest.raises(PatchError, match="norm_stats must be one of task, frozen"):
        resolve_patch(backbone, "bn", norm_stats="moving")


def test_task_patches_start_equal_and_train_separately():
    torch.manual_seed(0)
    backbone = build_backbone("mobilenet_v2", width=0.25)
    model = PatchedBackbone(backbone, resolve_patch(backbone, "bn+dw"), ["a", "b"]).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x, "a"), backbone(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in backbone.parameters())
    model.train()
    model(x, "a").sum().backward()
    assert all(p.grad is not None for p in model.patches["a"].parameters())
    assert all(p.grad is None for p in model.patches["b"].parameters())
    # Task "a" re-estimated its statistics; "b" and the shared backbone did not.
    a, b = model.patches["a"].tensors(), model.patches["b"].tensors()
    name = next(n for n in a if n.endswith("running_mean"))
    assert not torch.equal(a[name], b[name])
    assert torch.equal(b[name], dict(backbone.named_buffers())[name])


def test_frozen_statistics_keep_norm_layers_in_eval_mode():
    backbone = build_backbone("mobilenet_v2", width=0.25)
    model = PatchedBackbone(backbone, resolve_patch(backbone, "bn", norm_stats="frozen"), ["a"]).train()
    assert all(not m.training for m in backbone.modules() if isinstance(m, _BatchNorm))
    assert model.patches["a"].tensors().keys() == set(resolve_patch(backbone, "bn").params)


def test_train_shared_unfreezes_only_unpatched_parameters():
    backbone = build_backbone("mobilenet_v2", width=0.25)
    patch = resolve_patch(backbone, "bn")
    model = PatchedBackbone(backbone, patch, ["a"], train_shared=True)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in backbone.named_parameters()} - set(patch.params)
    assert len(model.shared_parameters()) == len(trainable)


def _bn_step(lean: bool, kind: str = "bn", autocast: bool = False):
    """One forward/backward of a tiny model: (gradients, bytes autograd saved beyond the model's own tensors)."""
    torch.manual_seed(0)
    backbone = build_backbone("mobilenet_v2", width=0.25)
    patch = resolve_patch(backbone, kind)
    model = PatchModule(backbone, patch, [TaskHead("t", 4)], lean_backward=lean, channels_last=True).train()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(2)  # the same dropout mask in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), saved_tensors_hooks(pack, lambda t: t):
        loss = model(images, "t").float().logsumexp(-1).mean()
    loss.backward()
    resident = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, sum(v for ptr, v in saved.items() if ptr not in resident)


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_backward_gives_the_same_gradients_from_less_saved_memory(autocast):
    plain, plain_bytes = _bn_step(False, autocast=autocast)
    lean, lean_bytes = _bn_step(True, autocast=autocast)
    assert lean_bytes < 0.8 * plain_bytes  # the frozen convolutions' inputs are not kept
    assert lean.keys() == plain.keys()
    for name, grad in plain.items():
        assert lean[name] is not None and lean[name].dtype == grad.dtype, name
        tolerance = {"rtol": 1e-2, "atol": 1e-3} if autocast else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(lean[name], grad, **tolerance)


def test_lean_backward_leaves_trainable_convolutions_alone():
    grads, _ = _bn_step(True, kind="bn+dw")
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "weight" in n), grads.keys()
