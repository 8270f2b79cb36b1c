"""Masks kept at one bit per element: ``pack`` a 0/1 tensor of any dense layout (NCHW, channels-last) into bytes,
8 elements each, in its memory order (numpy's ``packbits`` on the CPU: one pass); ``unpack`` gives back the same
values, in any dtype, with the same strides.

For ReLU / ReLU6 on the CPU (float32, bfloat16) the compiled kernel (``_masks.c``, built by ``pip install``) does
it in one pass each way: ``clamp_mask`` reads the activation's output and writes the bits, ``masked_grad`` reads
the gradient and the bits and writes the gradient that passes. Without it (no C compiler at install, CUDA, other
dtypes) they return ``None`` and the caller takes torch's ops."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

try:
    from modelpatch.models import _masks
except ImportError:  # built without a C compiler: torch's ops instead
    _masks = None
    logging.getLogger(__name__).warning(
        "modelpatch.models._masks is not built (no C compiler at install?): ReLU masks take torch's slower ops; "
        "reinstall with gcc to build it (make setup)"
    )

_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)  # numpy's packbits(bitorder="little"): the first element in the low bit


@dataclass(frozen=True)
class PackedMask:
    bits: torch.Tensor  # uint8, ceil(numel / 8) bytes
    shape: tuple[int, ...]
    order: tuple[int, ...]  # the dimensions from outermost to innermost in memory

    @property
    def nbytes(self) -> int:
        return self.bits.numel()


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The dimensions of ``t`` from outermost to innermost in memory; ``None`` if ``t`` is not dense (a view
    with gaps or overlaps)."""
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))
    return order if t.permute(order).is_contiguous() else None


def pack(mask: torch.Tensor) -> PackedMask | None:
    """``mask`` (0/1, any dtype) at one bit per element; ``None`` if its layout is not dense."""
    order = memory_order(mask)
    if order is None:
        return None
    flat = mask.permute(order).reshape(-1)
    if flat.dtype not in (torch.bool, torch.uint8):
        flat = flat != 0
    bits = _pack_numpy(flat) if _with_numpy(flat) else _pack_torch(flat)
    return PackedMask(bits, tuple(mask.shape), order)


def unpack(packed: PackedMask, dtype: torch.dtype) -> torch.Tensor:
    """The mask ``packed`` holds, as ``dtype``, with the strides it had: one gather of 8 values per byte from a
    table of the 256 bytes (no pass over a byte-per-element mask, no cast after)."""
    n = math.prod(packed.shape)
    rows = _table(dtype, packed.bits.device).index_select(0, packed.bits.long())
    return _in_order(rows.view(-1)[:n], packed.shape, packed.order)


def has_kernel() -> bool:
    """Whether the compiled ``_masks`` kernel was built and loads."""
    return _masks is not None


def _kernel_takes(t: torch.Tensor) -> bool:
    return (
        _masks is not None and t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES
        and not torch.compiler.is_compiling()
    )  # fmt: skip


def clamp_mask(out: torch.Tensor, max_val: float | None) -> PackedMask | None:
    """Where the gradient of ``relu`` (``max_val`` None) or ``hardtanh(0, max_val)`` passes, from the output
    ``out``: not ``out <= 0`` and not ``out >= max_val`` (NaN passes), at one bit per element; ``None`` where the
    kernel does not apply."""
    order = memory_order(out) if _kernel_takes(out) else None
    if order is None:
        return None
    bits = torch.empty((out.numel() + 7) // 8, dtype=torch.uint8)
    limit = math.nan if max_val is None else float(max_val)
    _masks.clamp_mask(out.data_ptr(), bits.data_ptr(), out.numel(), _KERNEL_DTYPES[out.dtype], limit, _threads())
    return PackedMask(bits, tuple(out.shape), order)


def masked_grad(grad: torch.Tensor, packed: PackedMask) -> torch.Tensor | None:
    """``grad`` where ``packed`` is 1, +0 where it is 0 (what ``threshold_backward`` / ``hardtanh_backward`` give),
    laid out as ``unpack`` lays out the mask (as PyTorch's op lays out its result from the gradient and that mask:
    where the gradient's strides leave the order open, on 1x1 maps, the mask's decides); ``None`` where the kernel
    does not apply (another dtype, or ``grad`` not laid out in the mask's memory order)."""
    if not (_kernel_takes(grad) and tuple(grad.shape) == packed.shape and grad.permute(packed.order).is_contiguous()):
        return None
    result = _empty_in_order(packed.shape, packed.order, grad.dtype)
    _masks.masked_grad(
        grad.data_ptr(), packed.bits.data_ptr(), result.data_ptr(), grad.numel(), _KERNEL_DTYPES[grad.dtype],
        _threads(),
    )  # fmt: skip
    return result


def _empty_in_order(shape: tuple[int, ...], order: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return _in_order(torch.empty(math.prod(shape), dtype=dtype), shape, order)


def _in_order(flat: torch.Tensor, shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """``flat`` (elements in memory order) seen as ``shape`` with the dimensions laid out in ``order``."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return flat.view([shape[d] for d in order]).permute(inverse)


def _threads() -> int:
    return torch.get_num_threads()


def _with_numpy(t: torch.Tensor) -> bool:
    """numpy's ``packbits``: one pass on the CPU; torch's ops elsewhere (CUDA, under ``torch.compile``)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _pack_numpy(flat: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))  # nonzero: 1


def _pack_torch(flat: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(flat.to(torch.uint8), (0, -flat.numel() % 8))
    weights = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8]``: the 8 bits of each byte value, first element in the low bit, as ``dtype``."""
    key = (dtype, device)
    if key not in _TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _TABLES[key] = bits.to(dtype=dtype, device=device)
    return _TABLES[key]
