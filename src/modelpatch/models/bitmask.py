"""Masks kept at one bit per element: ``pack`` a 0/1 tensor of any dense layout (NCHW, channels-last) into bytes,
8 elements each, in its memory order (numpy's ``packbits`` on the CPU: one pass); ``unpack`` gives back the same
values, in any dtype, with the same strides."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy's packbits order: the first element in the high bit


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
    inverse = sorted(range(len(packed.order)), key=packed.order.__getitem__)
    return rows.view(-1)[:n].view([packed.shape[d] for d in packed.order]).permute(inverse)


def _with_numpy(t: torch.Tensor) -> bool:
    """numpy's ``packbits``: one pass on the CPU; torch's ops elsewhere (CUDA, under ``torch.compile``)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _pack_numpy(flat: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(flat.numpy()))  # nonzero: 1


def _pack_torch(flat: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(flat.to(torch.uint8), (0, -flat.numel() % 8))
    weights = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8]``: the 8 bits of each byte value, first element in the high bit, as ``dtype``."""
    key = (dtype, device)
    if key not in _TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(7, -1, -1)) & 1
        _TABLES[key] = bits.to(dtype=dtype, device=device)
    return _TABLES[key]
