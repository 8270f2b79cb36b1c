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
- ReLU / ReLU6: the gradient reads only where the output was clipped. ``relu`` saves its output,
  ``hardtanh`` its input (in place: a copy of it). Where a layer that keeps its input (a convolution
  whose weight trains) reads the activation's output, a ReLU6 saves that output instead (nothing extra, no
  copy); where a layer keeps the tensor the plain op saves, the plain op runs; elsewhere a 1-bit mask
  replaces it (``LeanReLU``, ``LeanReLU6``; ``models/bitmask.py``, compiled one-pass kernels on the CPU).
- Hardswish, SiLU, GELU, sigmoid, LayerNorm: their gradients read the float input; kept.

Convolution and BatchNorm run PyTorch's own op and backward; a ``saved_tensors_hooks`` keeps, in place of the
input, its shape and strides, and the backward gets an uninitialized stand-in of that layout (the layout picks
the kernel). The activations call the aten ops PyTorch's own backward calls, on a stand-in rebuilt from the mask,
or the compiled kernel's equivalent (a bitwise select). So gradients are bit-for-bit the same
(tests/test_memory.py; at a NaN activation PyTorch's own ReLU6 backward depends on the memory layout, and the
mask may differ). Each falls back to the plain op when it cannot save, or when its input is smaller than
``MIN_ELEMENTS`` (there its Python costs more than its memory is worth).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.autograd.graph import saved_tensors_hooks

from modelpatch.models import bitmask

_PLACEHOLDERS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _placeholder(shape: torch.Size, strides: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor of ``shape`` and ``strides``, standing in for an input a backward op is given but
    whose values its requested gradients do not read. On the CPU one buffer per dtype, grown to the largest such
    input and shared by all: oneDNN still touches the input's memory, and fresh pages per call cost page faults
    (a 12.6 MB input: a 1x1 convolution's input gradient 2.3 ms -> 10.6 ms). Elsewhere a fresh tensor (CUDA's
    caching allocator hands back freed blocks; a buffer kept for good would hold device memory)."""
    if device.type != "cpu":
        return torch.empty_strided(shape, strides, dtype=dtype, device=device)
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) if all(shape) else 0
    buffer = _PLACEHOLDERS.get(dtype)
    if buffer is None or buffer.numel() < size:
        buffer = _PLACEHOLDERS[dtype] = torch.empty(size, dtype=dtype)
    return buffer.as_strided(shape, strides)


class _Unread(tuple):
    """What is kept of an input no requested gradient reads: its shape, strides, dtype and device."""


class _Kept(tuple):
    """A tensor an op saved (detached: no reference cycle through its node) and its version at the time."""


class _Outer(tuple):
    """What enclosing ``saved_tensors_hooks`` (a memory count, ``save_on_cpu``, checkpointing) packed."""


class _InputNotKept(saved_tensors_hooks):
    """Within it, PyTorch's own op saves for its own backward everything but ``x``; in ``x``'s place it keeps its
    shape and strides, and its backward gets a placeholder of that layout (the layout picks the kernel, as
    ``x``'s did). No Python ``autograd.Function``: the backward is PyTorch's own node, in C++. The other tensors
    go to the enclosing hooks if any, else are kept with PyTorch's check that no in-place op changed them.
    ``x`` is known by ``id`` (alive while the op runs): a reference to it here would keep it until backward."""

    def __init__(self, x: torch.Tensor):
        xid = id(x)
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        outer_pack, outer_unpack = outer if outer is not None else (None, None)

        def pack(t: torch.Tensor):
            if id(t) == xid:
                return _Unread((t.shape, t.stride(), t.dtype, t.device))
            if outer_pack is not None:
                return _Outer((outer_pack(t),))
            return _Kept((t.detach(), t._version))

        def unpack(kept):
            if type(kept) is _Unread:
                return _placeholder(*kept)
            if type(kept) is _Outer:
                return outer_unpack(kept[0])
            tensor, version = kept
            if tensor._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: {tuple(tensor.shape)} {tensor.dtype} is at version {tensor._version}; expected "
                    f"version {version} instead (modelpatch.models.memory)"
                )
            return tensor

        super().__init__(pack, unpack)


# Inputs smaller than this run the plain op: what a saver keeps out of memory there is a few hundred kB at most,
# while its Python (hooks, a custom backward) costs about as much per call as the op itself takes on such maps
# (mobilenet_v2 0.25 at batch 16: +29-63% a step with every layer lean; docs/benchmarks.md, saver-cost).
MIN_ELEMENTS = 1 << 15


def _recording(x: torch.Tensor) -> bool:
    """Whether a saver should run for input ``x``: autograd records this forward for a backward of its own (not
    under ``vmap`` or ``torch.compile``, whose transforms these savers are not written for), and ``x`` is large
    enough for what it saves to outweigh its cost (``MIN_ELEMENTS``)."""
    return (
        torch.is_grad_enabled() and x.numel() >= MIN_ELEMENTS
        and not torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()
    )  # fmt: skip


def check_mode(mode: object) -> None:
    """``lean_backward``'s values: ``"auto"``, ``True``, ``False`` (``use_memory_savers``)."""
    if not (mode is True or mode is False or mode == "auto"):
        raise ValueError(f"lean_backward={mode!r}: choose auto (the default), true or false")


class _InputSaver:
    """Mixin of ``LeanConv2d``/``LeanBatchNorm2d``: ``_on_cpu`` (set by ``use_memory_savers``) says whether
    it saves on the CPU too; on other devices it always does."""

    _on_cpu: bool = True

    def _device_saves(self, device: torch.device) -> bool:
        return self._on_cpu or device.type != "cpu"


class LeanConv2d(_InputSaver, nn.Conv2d):
    """A ``Conv2d`` that, while its weight is frozen, does not keep its input for backward (only a
    weight gradient reads it). A trainable weight (``dw`` patch, ``full``, ``train_shared``) runs
    the plain convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wanted = x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if not (wanted and _recording(x) and _conv_is_lean(self, x.device)):
            return super().forward(x)
        with _InputNotKept(x):
            return super().forward(x)


def _conv_is_lean(conv: nn.Module, device: torch.device) -> bool:
    """Whether ``conv`` (a ``LeanConv2d``) runs without keeping its input on ``device``."""
    return isinstance(conv, LeanConv2d) and not conv.weight.requires_grad and conv._device_saves(device)


class LeanBatchNorm2d(_InputSaver, nn.BatchNorm2d):
    """A ``BatchNorm2d`` that, in eval mode with a frozen weight, keeps no input for backward: eval-mode
    BatchNorm is ``x * scale + shift``, whose input and bias gradients read ``scale`` and the output
    gradient; only the weight gradient reads the input. CPU only: on CUDA, PyTorch may run cuDNN,
    whose backward is a different kernel; there, and in train mode or with a trained weight, it runs
    the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean = (
            (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
            and _recording(x) and not self.training and self.running_mean is not None
            and x.device.type == "cpu" and self._on_cpu and x.dim() == 4
            and (self.weight is None or not self.weight.requires_grad)
        )  # fmt: skip
        if not lean:
            return super().forward(x)
        with _InputNotKept(x):
            return super().forward(x)


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
        out = F.relu(x, inplace=inplace) if max_val is None else F.hardtanh(x, 0.0, max_val, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        # the output is <= 0, >= max_val or NaN exactly where the input is: its mask is the input's
        packed = bitmask.clamp_mask(out, max_val) if PACK_MASKS else None  # one pass, compiled
        if packed is None:
            one = torch.ones((), dtype=out.dtype, device=out.device)
            if max_val is None:
                passes = torch.ops.aten.threshold_backward(one, out, 0.0)
            else:
                passes = torch.ops.aten.hardtanh_backward(one, out, 0.0, max_val)
            packed = bitmask.pack(passes) if PACK_MASKS else None
            saved = passes.to(torch.uint8) if packed is None else packed.bits  # uint8 keeps the strides
        else:
            saved = packed.bits
        ctx.save_for_backward(saved)
        ctx.layout = None if packed is None else (packed.shape, packed.order)
        ctx.clamp = (max_val, out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        max_val, dtype = ctx.clamp
        packed = None if ctx.layout is None else bitmask.PackedMask(saved, *ctx.layout)
        passed = None if packed is None else bitmask.masked_grad(grad, packed)  # one pass, compiled
        if passed is not None:
            return passed, None, None
        # 1 where the gradient passes, with the strides of the tensor PyTorch would save
        stand_in = saved.to(dtype) if packed is None else bitmask.unpack(packed, dtype)  # unpack: in dtype
        if max_val is None:
            return torch.ops.aten.threshold_backward(grad, stand_in, 0.0), None, None
        return torch.ops.aten.hardtanh_backward(grad, stand_in, 0.0, max_val), None, None


class _ClampKeepingOutput(torch.autograd.Function):
    """``hardtanh`` with ``min_val`` 0 (``ReLU6``) that saves its output instead of its input, for when another
    layer keeps that output anyway (a convolution whose weight trains): nothing extra kept, no mask to
    compute, and in place no copy of the input. The gradient is the same: ``hardtanh_backward`` stops it where
    its tensor is ``<= 0`` or ``>= max_val``, and the output is ``<= 0`` (``== 0``), ``>= max_val`` or NaN
    exactly where the input is."""

    @staticmethod
    def forward(ctx, x, max_val, inplace):
        out = F.hardtanh(x, 0.0, max_val, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        ctx.max_val = max_val
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, out, 0.0, ctx.max_val), None, None


class _MaskIfOutputFree:
    """Mixin of ``LeanReLU``/``LeanReLU6``: a mask instead of the tensor the plain op saves while no
    other layer keeps that tensor (``_consumers``, set by ``use_memory_savers``; ``None``: unknown,
    plain op). ``_output_readers``: the layers that read the output (``None``: unknown)."""

    _consumers: tuple[nn.Module, ...] | None = None
    _output_readers: tuple[nn.Module, ...] | None = None

    def _mask(self, x: torch.Tensor) -> bool:
        return (
            _recording(x) and x.requires_grad and self._consumers is not None
            and not any(_keeps_input(m, x.device) for m in self._consumers)
        )  # fmt: skip

    def _output_kept(self, device: torch.device) -> bool:
        """Whether a layer that reads the output keeps it for backward."""
        readers = self._output_readers
        return readers is not None and any(_keeps_input(m, device) for m in readers)


class LeanReLU(_MaskIfOutputFree, nn.ReLU):
    """A ``ReLU`` that keeps a 1-bit mask for backward instead of its output, when no other layer
    keeps the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskedClamp.apply(x, None, self.inplace) if self._mask(x) else super().forward(x)


def _representable(value: float, dtype: torch.dtype) -> bool:
    """Whether ``value`` is exactly a normal value of the floating ``dtype`` (plain arithmetic: no tensor, no sync)."""
    info = torch.finfo(dtype)
    return info.tiny <= abs(value) <= info.max and (math.frexp(value)[0] * 2 / info.eps).is_integer()


class LeanReLU6(_MaskIfOutputFree, nn.ReLU6):
    """A ``ReLU6`` that keeps a 1-bit mask for backward instead of its input (its output when in
    place), when no other layer keeps that tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the masks are taken from the output: max_val must be a value of x's dtype (6.0 is)
        if not (self._mask(x) and self.min_val == 0.0 and _representable(self.max_val, x.dtype)):
            return super().forward(x)
        # under autocast the convolution keeps a cast copy, not this output
        if self._output_kept(x.device) and not torch.is_autocast_enabled(x.device.type):
            return _ClampKeepingOutput.apply(x, self.max_val, self.inplace)
        return _MaskedClamp.apply(x, self.max_val, self.inplace)


LEAN_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: LeanConv2d,
    nn.BatchNorm2d: LeanBatchNorm2d,
    nn.ReLU: LeanReLU,
    nn.ReLU6: LeanReLU6,
}


def _keeps_input(module: nn.Module, device: torch.device) -> bool:
    """Whether ``module`` (a consumer found by ``_output_consumers``) keeps its input for backward."""
    if isinstance(module, nn.Conv2d):
        return not _conv_is_lean(module, device)
    return module.weight.requires_grad  # nn.Linear: its input is saved for the weight gradient only


# Ops whose output shares its input's storage: a consumer of their output keeps the input alive.
_VIEW_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze}
_ADDS = {operator.add, operator.iadd, torch.add}  # keep nothing of their inputs


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in LEAN_CLASSES.values() or super().is_leaf_module(m, qualname)


def _output_consumers(model: nn.Module) -> dict[nn.Module, tuple[tuple | None, tuple | None]]:
    """For every ReLU / ReLU6 module of ``model``: the convolutions and linear layers that read the
    tensor its plain op saves (``relu``: its output, which in place is its input; ``hardtanh``:
    its input, in place a private copy), at any of its call sites, through views; ``None`` where
    some other op reads it (and may keep it) or the model cannot be traced (``torch.fx``). Second, the same
    for its output (for a ReLU6 that may save its output instead)."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # any model fx cannot trace keeps its plain activations
        return {}
    modules = dict(model.named_modules())
    found: dict[nn.Module, tuple[tuple | None, tuple | None]] = {}
    for node in graph.nodes:
        act = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(act, (nn.ReLU, nn.ReLU6)):
            continue
        relu = isinstance(act, nn.ReLU)
        output = _readers(node, modules)
        readers = output if relu else ()
        if relu == act.inplace:  # the saved tensor is the input: its other readers count
            for arg in node.all_input_nodes:
                readers = _merge(readers, _readers(arg, modules, skip=node))
        if act in found:
            readers, output = _merge(found[act][0], readers), _merge(found[act][1], output)
        found[act] = (readers, output)
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


def use_memory_savers(model: nn.Module, mode: str | bool = True) -> None:
    """Swap every ``Conv2d``, ``BatchNorm2d``, ``ReLU`` and ``ReLU6`` of ``model`` for its lean
    version (same parameters, buffers, state dict and outputs; same gradients, less kept for
    backward). Activations learn which layers read their output from a trace of ``model``.

    ``mode`` ``True``: every saver (BatchNorm's on the CPU only). ``"auto"``: on the CPU only the activations' (a
    ReLU6 saving the output a convolution keeps anyway, a 1-bit mask elsewhere), which cost nothing measurable
    there, while the convolution and BatchNorm savers cost 5-18% of a ``bn``/``bias`` step (docs/benchmarks.md,
    saver-cost); on other devices the convolutions' and the activations' (memory is the limit there)."""
    check_mode(mode)
    if mode is False:
        return
    consumers = _output_consumers(model)
    for module in model.modules():
        lean = LEAN_CLASSES.get(type(module))
        if lean is not None:
            module.__class__ = lean
        if isinstance(module, _InputSaver):
            module._on_cpu = mode is True
        if isinstance(module, _MaskIfOutputFree):
            module._consumers, module._output_readers = consumers.get(module, (None, None))
