"""Training-memory savers: the same gradients as PyTorch's own layers, from less kept for backward."""

import copy
import itertools
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from modelpatch.models import bitmask, memory
from modelpatch.models.memory import LeanBatchNorm2d, LeanConv2d, LeanReLU, LeanReLU6, _MaskedClamp, use_memory_savers
from modelpatch.models.multitask_forward import forward_mixed
from modelpatch.models.patches import resolve_patch
from modelpatch.training.module import PatchModule, TaskInfo
from modelpatch.training.weights import load_backbone

from .support import assert_close_scaled

# One backbone per family and activation: ReLU6, Hardswish (+ReLU), ReLU, SiLU, GELU/LayerNorm.
FAMILIES = ["mobilenet_v2", "mobilenet_v3_small", "resnet18", "efficientnet_b0", "convnext_tiny"]
# Patch kinds as the platform trains them, with BatchNorm statistics per task or frozen.
KINDS = ["full", "bn", "bn@frozen", "bias", "bias@frozen", "dw", "dw@frozen", "bn+dw", "logits@frozen"]
_BACKBONES: dict[str, nn.Module] = {}


@pytest.fixture(autouse=True)
def savers_on_every_map(monkeypatch):
    """The small maps of these tests run the savers too (by default, inputs under ``MIN_ELEMENTS`` run the plain
    op; ``test_small_maps_run_the_plain_ops`` checks that)."""
    monkeypatch.setattr(memory, "MIN_ELEMENTS", 0)


def backbone(name: str) -> nn.Module:
    """A fresh copy of a backbone built once per session (random init, deterministic)."""
    if name not in _BACKBONES:
        torch.manual_seed(0)
        _BACKBONES[name] = load_backbone(name, width=0.25) if name == "mobilenet_v2" else load_backbone(name)
    return copy.deepcopy(_BACKBONES[name])


def step(name: str, kind: str, lean: bool, autocast: bool = False, batch: int = 4):
    """One forward/backward: (gradients of the trainable parameters, bytes autograd saved beyond the
    model's own tensors, the model)."""
    kind, _, stats = kind.partition("@")
    bb = backbone(name)
    patch = resolve_patch(bb, kind, norm_stats=stats or "task")
    torch.manual_seed(0)  # the same head
    model = PatchModule(bb, patch, [TaskInfo("t", 4)], lean_backward=lean, channels_last=True).train()
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    resident = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(2)  # the same dropout and stochastic-depth draws in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), saved_tensors_hooks(pack, lambda t: t):
        loss = model(images, "t").float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, sum(saved.values()), model


def assert_same_grads(lean: dict, plain: dict, **tolerance) -> None:
    assert lean.keys() == plain.keys()
    for name, grad in plain.items():
        assert grad is not None and lean[name] is not None and lean[name].dtype == grad.dtype, name
        if tolerance:
            torch.testing.assert_close(lean[name], grad, **tolerance, msg=name)
        else:
            assert torch.equal(lean[name], grad), f"{name}: max diff {(lean[name] - grad).abs().max():.3g}"


@pytest.mark.parametrize(
    ("name", "kind"), [(n, k) for n in FAMILIES for k in KINDS if not (n == "resnet18" and "dw" in k)]
)  # resnet18 has no depthwise convolutions
def test_gradients_are_bit_for_bit_those_of_pytorchs_layers_from_no_more_memory(name, kind):
    plain, plain_bytes, _ = step(name, kind, lean=False)
    lean, lean_bytes, _ = step(name, kind, lean=True)
    assert_same_grads(lean, plain)
    assert lean_bytes <= plain_bytes


def test_each_saver_cuts_what_it_should_on_mobilenet_v2():
    full = step("mobilenet_v2", "full", lean=False)[1]
    # every convolution and BatchNorm input is read by a trained weight; ReLU6 keeps a mask, not a
    # copy of its input
    assert 0.7 * full < step("mobilenet_v2", "full", lean=True)[1] < 0.8 * full
    # frozen convolutions and BatchNorm keep nothing, each ReLU6 a 1-bit mask
    assert step("mobilenet_v2", "bias@frozen", lean=True)[1] < 0.12 * full
    # BatchNorm with batch statistics keeps its input for every gradient; ReLU6s keep masks
    assert step("mobilenet_v2", "bn", lean=True)[1] < 0.5 * full


@pytest.mark.parametrize(
    ("name", "kind"), [("mobilenet_v2", "bn"), ("mobilenet_v2", "bias@frozen"), ("resnet18", "bn")]
)
def test_gradients_are_the_same_under_bf16_autocast(name, kind):
    plain = step(name, kind, lean=False, autocast=True)[0]
    lean = step(name, kind, lean=True, autocast=True)[0]
    assert_same_grads(lean, plain)  # bit for bit here too: the same ops on the same bf16 tensors


def test_savers_are_on_by_default_and_off_with_lean_backward_false():
    _, _, model = step("mobilenet_v2", "bias@frozen", lean=True)
    types = {type(m) for m in model.modules()}
    assert {LeanConv2d, LeanBatchNorm2d, LeanReLU6} <= types
    _, _, plain = step("mobilenet_v2", "bias@frozen", lean=False)
    assert not any(type(m).__module__ == "modelpatch.models.memory" for m in plain.modules())
    assert PatchModule.__init__.__kwdefaults__["lean_backward"] == "auto"


def test_auto_keeps_only_the_relu_savers_on_the_cpu():
    """``auto`` on the CPU: convolutions and BatchNorm keep their inputs (their savers cost time there), so a ReLU6
    saves the output its convolution keeps; the same gradients, and less memory than PyTorch's layers."""
    plain, plain_bytes, _ = step("mobilenet_v2", "bias@frozen", lean=False, batch=16)
    auto, auto_bytes, model = step("mobilenet_v2", "bias@frozen", lean="auto", batch=16)
    every, every_bytes, _ = step("mobilenet_v2", "bias@frozen", lean=True, batch=16)
    assert_same_grads(auto, plain)
    assert_same_grads(every, plain)
    assert every_bytes < auto_bytes < plain_bytes
    conv = model.model.backbone.body.features[2].conv[1][0]
    assert isinstance(conv, LeanConv2d) and not conv._on_cpu and conv._device_saves(torch.device("meta"))
    with pytest.raises(ValueError, match="lean_backward='yes': choose auto"):
        use_memory_savers(backbone("mobilenet_v2"), "yes")


def test_a_relu_output_read_by_a_trained_weight_is_kept_not_masked():
    bb = backbone("resnet18")
    use_memory_savers(bb)
    block, following = bb.body.layer1[0], bb.body.layer1[1]
    # in-place ReLU, called twice: its output feeds conv2, then the next block's conv1 (and its add)
    assert block.relu._consumers == (block.conv2, following.conv1)
    for p in bb.parameters():
        p.requires_grad_(False)
    x = torch.ones(1, requires_grad=True)
    assert block.relu._mask(x)
    following.conv1.weight.requires_grad_(True)  # it keeps its input: a mask would come on top
    assert not block.relu._mask(x)
    # mobilenet_v2's in-place ReLU6: PyTorch saves a copy of its input, which no other layer holds
    mbv2 = backbone("mobilenet_v2")
    use_memory_savers(mbv2)
    relu6, depthwise = mbv2.body.features[2].conv[0][2], mbv2.body.features[2].conv[1][0]
    assert relu6._consumers == () and relu6._output_readers == (depthwise,)
    for p in mbv2.parameters():
        p.requires_grad_(False)
    assert relu6._mask(x) and not relu6._output_kept(x.device)  # a frozen depthwise conv keeps nothing: a mask
    depthwise.weight.requires_grad_(True)  # (dw patch) it keeps the output: ReLU6 saves that, no mask
    assert relu6._output_kept(x.device)


@pytest.mark.parametrize("max_val", [None, 6.0])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(("shape", "layout"), [((2, 5, 2, 2), "channels_last"), ((3, 5, 3, 3), "nchw"),
                                               ((3, 5, 3, 3), "channels_last")])  # fmt: skip
def test_masked_relu_matches_pytorch_on_edge_values(max_val, inplace, shape, layout):
    """Every edge value in every position (135 elements: not a whole number of bytes of bits)."""
    values = torch.tensor([-1.0, -0.0, 0.0, 1e-45, 3.0, 6.0, 6.5, float("inf"), float("-inf"), float("nan")])
    x = values.repeat(14)[: torch.Size(shape).numel()].view(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.linspace(-2, 2, x.numel()).view_as(x)

    def run(fn):
        leaf = x.clone().requires_grad_()
        out = fn(leaf * 1)
        (g,) = torch.autograd.grad(out, leaf, grad)
        return out, g

    if max_val is None:
        ref = run(lambda t: F.relu(t, inplace=inplace))
    else:
        ref = run(lambda t: F.hardtanh(t, 0.0, max_val, inplace=inplace))
    got = run(lambda t: _MaskedClamp.apply(t, max_val, inplace))
    assert torch.equal(got[0].nan_to_num(7.0), ref[0].nan_to_num(7.0))
    # At a NaN PyTorch's own backward passes the gradient or not depending on whether the element
    # falls in a vectorized block or the scalar tail, which depends on the gradient's layout too:
    # the mask, taken in the forward, follows the input's.
    real = ~x.isnan()
    assert torch.equal(got[1][real], ref[1][real]) and got[1].stride() == ref[1].stride()


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.rand(3, 5, 7, 9, generator=g) > 0.5,  # 945 elements: 118 bytes and one bit
        lambda g: (torch.rand(3, 5, 7, 9, generator=g) > 0.5).contiguous(memory_format=torch.channels_last),
        lambda g: (torch.rand(4, 6, 5, generator=g) > 0.3).permute(2, 0, 1),  # any dense order
        lambda g: torch.ones(1, 1, 1, 1, dtype=torch.bool),
        lambda g: torch.rand(2, 0, 3, generator=g) > 0.5,
    ],
    ids=["nchw-odd", "channels-last-odd", "permuted", "one", "empty"],
)
def test_a_packed_mask_comes_back_with_its_values_and_strides(make):
    mask = make(torch.Generator().manual_seed(0))
    packed = bitmask.pack(mask.to(torch.float32))
    assert packed.nbytes == -(-mask.numel() // 8)
    assert torch.equal(packed.bits, bitmask._pack_torch(mask.permute(packed.order).reshape(-1)))  # CUDA's way
    for dtype in (torch.float32, torch.bfloat16, torch.uint8):
        back = bitmask.unpack(packed, dtype)
        assert back.dtype == dtype and back.stride() == mask.stride() and torch.equal(back, mask.to(dtype))
    assert bitmask.pack(torch.ones(4, 4)[:, :2]) is None  # not dense (gaps): a byte per element


def test_small_maps_run_the_plain_ops(monkeypatch):
    monkeypatch.setattr(memory, "MIN_ELEMENTS", 1 << 15)
    plain, plain_bytes, _ = step("mobilenet_v2", "bias@frozen", lean=False, batch=2)  # maps under 2 x 48 x 16 x 16
    lean, lean_bytes, _ = step("mobilenet_v2", "bias@frozen", lean=True, batch=2)
    assert lean_bytes == plain_bytes
    assert_same_grads(lean, plain)
    big = step("mobilenet_v2", "bias@frozen", lean=True, batch=64)[1]  # maps up to 64 x 48 x 16 x 16
    assert big < 0.5 * step("mobilenet_v2", "bias@frozen", lean=False, batch=64)[1]


@pytest.mark.parametrize("layer", ["conv", "batchnorm"])
def test_a_frozen_layer_lets_its_input_go_before_backward(layer):
    """Nothing keeps the input of a frozen convolution or eval-mode BatchNorm alive until backward (not the
    saved-tensor hooks either), and its gradients are PyTorch's."""
    torch.manual_seed(0)
    if layer == "conv":
        plain = nn.Conv2d(8, 8, 3, padding=1, bias=False).requires_grad_(False)
    else:
        plain = nn.BatchNorm2d(8).eval()
        plain.weight.requires_grad_(False)
    lean = copy.deepcopy(plain)
    use_memory_savers(lean)
    a = torch.randn(4, 8, 64, 64, requires_grad=True)

    def run(module, check_freed: bool):
        y = a * 2
        gone = weakref.ref(y)
        out = module(y)
        del y
        assert (gone() is None) == check_freed
        return torch.autograd.grad(out.square().sum(), a)[0]

    assert torch.equal(run(lean, check_freed=True), run(plain, check_freed=False))


def test_an_in_place_change_of_a_saved_tensor_is_refused_as_pytorch_refuses_it():
    conv = nn.Conv2d(8, 8, 1).requires_grad_(False)
    conv.bias.requires_grad_(True)
    use_memory_savers(conv)
    out = conv(torch.randn(4, 8, 64, 64, requires_grad=True))
    with torch.no_grad():
        conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_the_compiled_mask_kernel_is_built():
    """``pip install`` builds ``models/_masks.c`` (make setup does); without it the masks take torch's ops, several
    times slower per step (docs/benchmarks.md, saver-cost)."""
    assert bitmask.has_kernel(), "modelpatch.models._masks is missing: reinstall with a C compiler (make setup)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(("max_val", "inplace"), [(None, False), (6.0, False), (6.0, True)])
def test_kernel_masks_give_pytorchs_gradients_on_large_maps(dtype, layout, max_val, inplace, monkeypatch):
    """Maps large enough to split over threads, an odd size (a scalar tail after the vector loop), values exactly
    at 0 and 6: the compiled kernel and the torch fallback give PyTorch's own outputs and gradients, bit for bit."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-4, 9, (3, 7, 130, 131), generator=g).to(dtype) + torch.rand(3, 7, 130, 131, generator=g).to(
        dtype
    ) * (torch.rand(3, 7, 130, 131, generator=g) > 0.3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=g).to(dtype)

    def run(fn):
        leaf = x.clone().requires_grad_()
        out = fn(leaf * 1)
        (back,) = torch.autograd.grad(out, leaf, grad)
        return out, back

    plain = run(lambda t: F.relu(t, inplace) if max_val is None else F.hardtanh(t, 0.0, max_val, inplace))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernel = run(lambda t: _MaskedClamp.apply(t, max_val, inplace))
        monkeypatch.setattr(bitmask, "_masks", None)
        fallback = run(lambda t: _MaskedClamp.apply(t, max_val, inplace))
    finally:
        torch.set_num_threads(threads)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # bit for bit: +0 where the gradient stops
    for got in (kernel, fallback):
        assert torch.equal(got[0].view(bits), plain[0].view(bits)) and torch.equal(
            got[1].view(bits), plain[1].view(bits)
        )
        assert got[1].stride() == plain[1].stride()


def test_an_untraceable_model_keeps_plain_activations_and_trains():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    model = Branchy()
    use_memory_savers(model)
    assert isinstance(model.act, LeanReLU) and model.act._consumers is None
    model.conv.weight.requires_grad_(False)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    assert not model.act._mask(x)
    model(x).sum().backward()
    assert x.grad is not None


def test_lean_backward_leaves_trainable_convolutions_alone():
    grads, _, _ = step("mobilenet_v2", "bn+dw", lean=True)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "weight" in n), grads.keys()


def test_memory_savers_keep_the_state_dict():
    bb = backbone("mobilenet_v2")
    before = bb.state_dict()
    use_memory_savers(bb)
    after = bb.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, LeanReLU6) for m in bb.modules())


def test_savers_step_aside_under_vmap():
    """``forward_mixed`` runs other patches under ``torch.func.vmap``, which custom backward
    functions do not support: there the plain layers run, even with gradients enabled."""
    bb = backbone("mobilenet_v2")
    model = PatchModule(bb, resolve_patch(bb, "bias"), [TaskInfo("a", 3), TaskInfo("b", 3)])
    model.eval().model._twin = [None]  # no per-sample twin: the vmap path
    images = torch.rand(4, 3, 32, 32)
    mixed = forward_mixed(model.model, images, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    assert_close_scaled(mixed[:1], model.model(images[:1], "a"), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_relu6_masks_only_where_its_bound_is_exact_in_the_dtype(dtype):
    """The output-taken masks need max_val to be a value of the dtype; the check is arithmetic, so it
    must agree with a round trip through a tensor."""
    for value in (6.0, 6.03125, 0.1, 1 / 3, 65504.0, 70000.0, 1e-30, 3.0e38):
        assert memory._representable(value, dtype) == (torch.tensor(value, dtype=dtype).item() == value), value
