"""The patch vocabulary: what each kind selects, composition, errors, per-task copies."""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from modelpatch.models.patches import PatchedBackbone, PatchError, parse_kind, resolve_patch
from modelpatch.training.weights import load_backbone


def numel(model: nn.Module, names) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def test_mobilenet_v2_patch_sizes_match_the_paper():
    backbone = load_backbone("mobilenet_v2", width=1.0)
    assert numel(backbone, resolve_patch(backbone, "bn").params) == 34_112
    assert numel(backbone, resolve_patch(backbone, "dw").params) == 64_224
    assert numel(backbone, resolve_patch(backbone, "bn+dw").params) == 34_112 + 64_224
    assert resolve_patch(backbone, "logits").params == ()
    assert numel(backbone, resolve_patch(backbone, "full").params) == sum(p.numel() for p in backbone.parameters())


# Parameter counts per kind, worked out by hand from each architecture's published layer widths (not
# from the selectors): a norm layer of C channels has 2C (scale, bias); a depthwise k x k convolution of
# C channels has C*k*k (+ C with a bias). The final Linear is removed from every backbone.
RESNET18_NORM = 64 + 4 * 64 + (5 * 128) + (5 * 256) + (5 * 512)  # stem, layer1, layer2-4 (+ downsample): 4800
# EfficientNet-B0 MBConv stages (expand, kernel, in -> out, blocks), stem 32, head 1280: every block has a
# BatchNorm after its expansion (in*expand channels, not with expand 1), its depthwise convolution and its
# projection (out); its squeeze-excitation convolutions have biases (in // 4 and in*expand channels).
EFFNET_B0 = [(1, 3, 32, 16, 1), (6, 3, 16, 24, 2), (6, 5, 24, 40, 2), (6, 3, 40, 80, 3), (6, 5, 80, 112, 3),
             (6, 5, 112, 192, 4), (6, 3, 192, 320, 1)]  # fmt: skip


def _effnet_b0_counts() -> tuple[int, int, int]:
    norm = dw = se_bias = 0
    for expand, k, c_in, c_out, blocks in EFFNET_B0:
        for b in range(blocks):
            inner = (c_in if b == 0 else c_out) * expand
            norm += (inner if expand > 1 else 0) + inner + c_out
            dw += inner * k * k
            se_bias += (c_in if b == 0 else c_out) // 4 + inner
    norm += 32 + 1280
    return 2 * norm, dw, norm + se_bias


EFFNET_BN, EFFNET_DW, EFFNET_BIAS = _effnet_b0_counts()  # 42,016 / 182,016 / 30,348
CONVNEXT_DIMS, CONVNEXT_DEPTHS = (96, 192, 384, 768), (3, 3, 9, 3)
# ConvNeXt-Tiny: a LayerNorm per block, in the stem, before each of 3 downsamplings and in the classifier;
# a 7x7 depthwise convolution with bias per block; biases also in each block's two pointwise Linears
# (4C and C), the stem and downsampling convolutions.
CONVNEXT_BLOCKS = sum(c * d for c, d in zip(CONVNEXT_DIMS, CONVNEXT_DEPTHS, strict=True))  # 6,624 channels
CONVNEXT_NORM = CONVNEXT_BLOCKS + 96 + (96 + 192 + 384) + 768  # 8,160 channels
CONVNEXT_BIAS = CONVNEXT_NORM + CONVNEXT_BLOCKS * (1 + 5) + 96 + (192 + 384 + 768)  # 49,344

# name -> (bn, dw, bias) parameters; None: the kind selects nothing there
EXPECTED = {
    "mobilenet_v2": (34_112, 64_224, 17_056),  # width 1.0: the paper's numbers
    "resnet18": (2 * RESNET18_NORM, None, RESNET18_NORM),  # 9,600 / - / 4,800: its convolutions have no bias
    "efficientnet_b0": (EFFNET_BN, EFFNET_DW, EFFNET_BIAS),
    "convnext_tiny": (2 * CONVNEXT_NORM, CONVNEXT_BLOCKS * (49 + 1), CONVNEXT_BIAS),  # 16,320 / 331,200 / 49,344
}


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "convnext_tiny", "efficientnet_b0"])
def test_each_kind_selects_the_right_layers(name):
    backbone = load_backbone(name)
    bn_count, dw_count, bias_count = EXPECTED[name]
    bn = resolve_patch(backbone, "bn").params
    assert numel(backbone, bn) == bn_count
    bias = resolve_patch(backbone, "bias").params
    assert numel(backbone, bias) == bias_count and all(n.endswith(".bias") for n in bias)
    if dw_count is None:
        with pytest.raises(PatchError, match="no depthwise convolutions"):
            resolve_patch(backbone, "dw")
        return
    dw = resolve_patch(backbone, "dw").params
    assert numel(backbone, dw) == dw_count
    assert set(resolve_patch(backbone, "bn+dw").params) == set(bn) | set(dw)


def test_convnext_bn_patch_is_its_layernorms():
    backbone = load_backbone("convnext_tiny")
    assert not any(isinstance(m, _BatchNorm) for m in backbone.modules())
    patch = resolve_patch(backbone, "bn")
    assert len(patch.params) > 0 and patch.buffers == ()


def test_a_patch_that_selects_nothing_names_backbone_and_alternatives():
    backbone = load_backbone("resnet18")
    with pytest.raises(PatchError, match=r"'dw' selects nothing on resnet18.*depthwise.*bias, bn, full, logits"):
        resolve_patch(backbone, "bn+dw", model_name="resnet18")


@pytest.mark.parametrize("kind", ["bnn", "bn+foo", "", "bn+"])
def test_unknown_kinds_are_refused_with_the_valid_ones(kind):
    with pytest.raises(PatchError, match="kinds: bias, bn, dw, full, logits"):
        parse_kind(kind)


def test_repeated_kind_and_bad_norm_stats():
    backbone = load_backbone("mobilenet_v2", width=0.25)
    with pytest.raises(PatchError, match="twice"):
        parse_kind("bn+bn")
    with pytest.raises(PatchError, match="norm_stats must be one of task, frozen"):
        resolve_patch(backbone, "bn", norm_stats="moving")


def test_task_patches_start_equal_and_train_separately():
    torch.manual_seed(0)
    backbone = load_backbone("mobilenet_v2", width=0.25)
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
    backbone = load_backbone("mobilenet_v2", width=0.25)
    model = PatchedBackbone(backbone, resolve_patch(backbone, "bn", norm_stats="frozen"), ["a"]).train()
    assert all(not m.training for m in backbone.modules() if isinstance(m, _BatchNorm))
    assert model.patches["a"].tensors().keys() == set(resolve_patch(backbone, "bn").params)


def test_train_shared_unfreezes_only_unpatched_parameters():
    backbone = load_backbone("mobilenet_v2", width=0.25)
    patch = resolve_patch(backbone, "bn")
    model = PatchedBackbone(backbone, patch, ["a"], train_shared=True)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in backbone.named_parameters()} - set(patch.params)
    assert len(model.shared_parameters()) == len(trainable)
