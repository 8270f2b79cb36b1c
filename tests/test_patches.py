"""The patch vocabulary: what each kind selects, composition, errors, per-task copies."""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from modelpatch.backbones import build_backbone
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
