"""Training-memory savers: layers that keep less for backward than PyTorch's own, same gradients.

PyTorch saves for backward whatever *some* gradient of an op could read. A patch trains few
parameters, so most of that is never read. What each gradient reads (mobilenet_v2 numbers:
docs/benchmarks.md):

- convolution: the weight gradient reads the input; the input gradient only the weight. A frozen
  convolution keeps no input (``LeanConv2d``).
- BatchNorm with frozen statistics (eval mode) is ``x * scale + shift``: the input gradient reads
  ``scale``, the bias gradient only the output gradient; only a *trained weight* reads the input.
  With a frozen weight it keeps no input (``LeanBatchNorm2d``). With statistics of the batch
  (train mode) every gradient reads the normalized input: the input stays.
- ReLU / ReLU6: the gradient reads only where the output was clipped; a 1-bit mask replaces the
  4-byte tensor PyTorch saves (``LeanReLU``, ``LeanReLU6``): ``relu`` saves its output,
  ``hardtanh`` its input (in place: a copy of it). Where another layer keeps that tensor anyway (a
  convolution whose weight trains reads a ReLU's output) the mask would be extra: the plain op runs.
- Hardswish, SiLU, GELU, sigmoid, LayerNorm: their gradients read the float input; kept.

Each saver calls the aten ops PyTorch's own backward calls, on the same tensors, except the input
the gradient does not read (an uninitialized buffer of its shape and strides; for a ReLU, a
stand-in rebuilt from the mask), so gradients are
bit-for-bit the same (tests/test_memory.py; at a NaN activation PyTorch's own ReLU6 backward
depends on the memory layout, and the mask may differ). Each falls back to the plain op when it
cannot save.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from modelpatch.models import bitmask


class _FrozenConv2d(torch.autograd.Function):
    """``conv2d`` whose weight gets no gradient: it saves only the weight, not the input (which only
    a weight gradient needs); the input and bias gradients come from ``convolution_backward``, the
    op PyTorch's own backward calls, with the weight gradient not requested."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, x.stride(), x.dtype, bias, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, strides, dtype, bias, stride, padding, dilation, groups = ctx.conv
        # only the input's shape and strides are read; a real (uninitialized) buffer with the input's
        # strides keeps oneDNN on the input's path, where an expanded 1-element tensor does not
        placeholder = torch.empty_strided(shape, strides, dtype=grad.dtype, device=grad.device)
        grad_input, _, grad_bias = torch.ops.aten.convolution_backward(
            grad, placeholder, weight.to(grad.dtype), None if bias is None else [bias.shape[0]], stride, padding,
            dilation, False, [0], groups, (ctx.needs_input_grad[0], False, ctx.needs_input_grad[2]),
        )  # fmt: skip
        # .to: autocast ran the forward in bf16/fp16
        grad_input = None if grad_input is None else grad_input.to(dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_input, None, grad_bias, None, None, None, None


def _recording() -> bool:
    """Whether autograd records this forward for a backward of its own (not under ``vmap`` and the
    like, whose transforms the savers' custom backward functions do not support)."""
    return torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()


class LeanConv2d(nn.Conv2d):
    """A ``Conv2d`` that, while its weight is frozen, does not keep its input for backward (only a
    weight gradient reads it). A trainable weight (``dw`` patch, ``full``, ``train_shared``) runs
    the plain convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wanted = x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if not (wanted and _recording() and _conv_is_lean(self)):
            return super().forward(x)
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _conv_is_lean(conv: nn.Module) -> bool:
    """Whether ``conv`` (a ``LeanConv2d``) runs without keeping its input."""
    return (
        isinstance(conv, LeanConv2d) and not conv.weight.requires_grad
        and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    )  # fmt: skip


class _FrozenBatchNorm(torch.autograd.Function):
    """Eval-mode ``batch_norm`` with a frozen weight: saves no input. The input and bias gradients
    come from ``native_batch_norm_backward``, as PyTorch's own backward computes them; in eval mode
    it reads the input only for the weight gradient, which is not requested."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps):
        ctx.save_for_backward(weight, running_mean, running_var)
        ctx.input = (x.shape, x.stride(), x.dtype, eps)  # the strides pick the kernel, as x's did
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        weight, running_mean, running_var = ctx.saved_tensors
        shape, stride, dtype, eps = ctx.input
        placeholder = torch.empty_strided(shape, stride, dtype=dtype, device=grad.device)
        grad_input, _, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, placeholder, weight, running_mean, running_var, None, None, False, eps,
            [ctx.needs_input_grad[0], False, ctx.needs_input_grad[2]],
        )  # fmt: skip
        return grad_input, None, grad_bias, None, None, None


class LeanBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` that, in eval mode with a frozen weight, keeps no input for backward (a
    trained bias needs only the output gradient). CPU only: on CUDA, PyTorch may run cuDNN, whose
    backward is a different kernel; there, and in train mode or with a trained weight, it runs
    the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean = (
            (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
            and _recording() and not self.training and self.running_mean is not None
            and x.device.type == "cpu" and x.dim() == 4
            and (self.weight is None or not self.weight.requires_grad)
        )  # fmt: skip
        if not lean:
            return super().forward(x)
        return _FrozenBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps)


PACK_MASKS = True  # ReLU masks at 1 bit per element (False: 1 byte; bench/mask_bytes.py compares them)


class _MaskedClamp(torch.autograd.Function):
    """``relu`` / ``hardtanh`` with ``min_val`` 0 (``ReLU6``) that saves, instead of a float tensor, a
    1-bit mask of where the gradient passes (``models.bitmask``; 1 byte where the layout is not dense). The
    mask is PyTorch's own ``threshold_backward`` /
    ``hardtanh_backward`` of a gradient of 1, on the tensor PyTorch would save (its test, NaN
    handling included); backward calls that same op on a stand-in rebuilt from the mask (1 where
    the gradient passes, 0 where it stops) with that tensor's strides: the same values and layout,
    so the next layers' backward picks the same kernels (a plain ``where`` differs on 1x1 maps)."""

    @staticmethod
    def forward(ctx, x, max_val, inplace):
        one = torch.ones((), dtype=x.dtype, device=x.device)
        if max_val is None:  # relu saves its output
            out = F.relu(x, inplace=inplace)
            passes = torch.ops.aten.threshold_backward(one, out, 0.0)
        else:  # hardtanh saves its input (in place: a copy of it)
            passes = torch.ops.aten.hardtanh_backward(one, x, 0.0, max_val)
            out = F.hardtanh(x, 0.0, max_val, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        packed = bitmask.pack(passes) if PACK_MASKS else None
        ctx.save_for_backward(passes.to(torch.uint8) if packed is None else packed.bits)  # uint8 keeps the strides
        ctx.layout = None if packed is None else (packed.shape, packed.order)
        ctx.clamp = (max_val, passes.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        max_val, dtype = ctx.clamp
        # 1 where the gradient passes, with the strides of the tensor PyTorch would save
        if ctx.layout is None:
            stand_in = saved.to(dtype)
        else:
            stand_in = bitmask.unpack(bitmask.PackedMask(saved, *ctx.layout), dtype)  # no cast: in dtype
        if max_val is None:
            return torch.ops.aten.threshold_backward(grad, stand_in, 0.0), None, None
        return torch.ops.aten.hardtanh_backward(grad, stand_in, 0.0, max_val), None, None


class _MaskIfOutputFree:
    """Mixin of ``LeanReLU``/``LeanReLU6``: a mask instead of the tensor the plain op saves while no
    other layer keeps that tensor (``_consumers``, set by ``use_memory_savers``; ``None``: unknown,
    plain op)."""

    _consumers: tuple[nn.Module, ...] | None = None

    def _mask(self, x: torch.Tensor) -> bool:
        return (
            _recording() and x.requires_grad and self._consumers is not None
            and not any(_keeps_input(m) for m in self._consumers)
        )  # fmt: skip


class LeanReLU(_MaskIfOutputFree, nn.ReLU):
    """A ``ReLU`` that keeps a 1-bit mask for backward instead of its output, when no other layer
    keeps the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskedClamp.apply(x, None, self.inplace) if self._mask(x) else super().forward(x)


class LeanReLU6(_MaskIfOutputFree, nn.ReLU6):
    """A ``ReLU6`` that keeps a 1-bit mask for backward instead of its input (its output when in
    place), when no other layer keeps that tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.min_val == 0.0 and self._mask(x)):
            return super().forward(x)
        return _MaskedClamp.apply(x, self.max_val, self.inplace)


LEAN_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: LeanConv2d,
    nn.BatchNorm2d: LeanBatchNorm2d,
    nn.ReLU: LeanReLU,
    nn.ReLU6: LeanReLU6,
}


def _keeps_input(module: nn.Module) -> bool:
    """Whether ``module`` (a consumer found by ``_output_consumers``) keeps its input for backward."""
    if isinstance(module, nn.Conv2d):
        return not _conv_is_lean(module)
    return module.weight.requires_grad  # nn.Linear: its input is saved for the weight gradient only


# Ops whose output shares its input's storage: a consumer of their output keeps the input alive.
_VIEW_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze}
_ADDS = {operator.add, operator.iadd, torch.add}  # keep nothing of their inputs


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in LEAN_CLASSES.values() or super().is_leaf_module(m, qualname)


def _output_consumers(model: nn.Module) -> dict[nn.Module, tuple[nn.Module, ...] | None]:
    """For every ReLU / ReLU6 module of ``model``: the convolutions and linear layers that read the
    tensor its plain op saves (``relu``: its output, which in place is its input; ``hardtanh``:
    its input, in place a private copy), at any of its call sites, through views; ``None`` where
    some other op reads it (and may keep it) or the model cannot be traced (``torch.fx``)."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # any model fx cannot trace keeps its plain activations
        return {}
    modules = dict(model.named_modules())
    found: dict[nn.Module, tuple[nn.Module, ...] | None] = {}
    for node in graph.nodes:
        act = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(act, (nn.ReLU, nn.ReLU6)):
            continue
        relu = isinstance(act, nn.ReLU)
        readers = _readers(node, modules) if relu else ()
        if relu == act.inplace:  # the saved tensor is the input: its other readers count
            for arg in node.all_input_nodes:
                readers = _merge(readers, _readers(arg, modules, skip=node))
        found[act] = _merge(found.get(act, ()), readers) if act in found else readers
    return found


def _merge(a: tuple | None, b: tuple | None) -> tuple | None:
    return None if a is None or b is None else a + b


def _readers(node: fx.Node, modules: dict[str, nn.Module], skip: fx.Node | None = None) -> tuple | None:
    out: tuple = ()
    for user in node.users:
        if user is skip:
            continue
        module = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            out += (module,)
        elif (
            (user.op == "call_function" and user.target in _ADDS)
            or (user.op == "call_method" and user.target in ("add", "add_"))
        ):  # fmt: skip
            continue
        elif (
            (user.op == "call_method" and user.target in _VIEW_METHODS)
            or (user.op == "call_function" and user.target in _VIEW_FUNCTIONS)
            or isinstance(module, (nn.Identity, nn.Flatten))
        ):
            out = _merge(out, _readers(user, modules))
        else:
            return None
        if out is None:
            return None
    return out


def use_memory_savers(model: nn.Module) -> None:
    """Swap every ``Conv2d``, ``BatchNorm2d``, ``ReLU`` and ``ReLU6`` of ``model`` for its lean
    version (same parameters, buffers, state dict and outputs; same gradients, less kept for
    backward). Activations learn which layers read their output from a trace of ``model``."""
    consumers = _output_consumers(model)
    for module in model.modules():
        lean = LEAN_CLASSES.get(type(module))
        if lean is not None:
            module.__class__ = lean
        if isinstance(module, _MaskIfOutputFree):
            module._consumers = consumers.get(module)
