"""State-dict helpers every layer that loads or checks tensors shares: hashing them, and saying which keys of
a state dict do not fit a model."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch


def hash_tensors(tensors: Mapping[str, torch.Tensor], digest=None, *, dtypes: bool = True):
    """Feed each tensor's name, dtype (``dtypes``), shape and bytes into ``digest`` (default: a new sha256), in
    name order; returns the digest. Model fingerprints leave dtypes out, as they always have."""
    digest = digest if digest is not None else hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        if dtypes:
            digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest


@dataclass
class KeyMismatch:
    """Keys of a state dict that do not fit the one expected: ``wrong_shape`` as ``key (given) vs (expected)``."""

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def describe(self, show: int = 4) -> str:
        """``missing: a, b ...; unexpected: c; wrong shape: d (3,) vs (5,)``, at most ``show`` keys each."""
        parts = [
            f"{label}: {', '.join(keys[:show])}{f' and {len(keys) - show} more' if len(keys) > show else ''}"
            for label, keys in (
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("wrong shape", self.wrong_shape),
            )
            if keys
        ]
        return "; ".join(parts)


def compare_keys(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *, optional: tuple[str, ...] = ()
) -> KeyMismatch:
    """What of ``given`` does not fit ``expected``; expected keys starting with one of ``optional`` may be absent."""
    return KeyMismatch(
        missing=sorted(k for k in expected if k not in given and not k.startswith(optional)),
        unexpected=sorted(k for k in given if k not in expected),
        wrong_shape=sorted(
            f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
            for k in given
            if k in expected and given[k].shape != expected[k].shape
        ),
    )
