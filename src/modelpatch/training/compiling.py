"""``torch.compile`` of the patched backbone, switched on by the run's ``compile`` key."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("modelpatch")


def compile_backend(how: bool | str | None) -> str | None:
    """The ``torch.compile`` backend the ``compile`` key asks for: ``false`` none, ``true`` inductor, or a
    backend name (``eager``, ``aot_eager``, ``inductor``, ...).

    Raises:
        ValueError: naming the bad value and the backends this torch has.
    """
    if how is False or how is None:
        return None
    if how is not True and not isinstance(how, str):
        raise ValueError(f"compile={how!r}; choose false, true, or a torch.compile backend such as inductor")
    backend = "inductor" if how is True else how
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        listed = ", ".join(torch._dynamo.list_backends())
        raise ValueError(f"compile={backend!r} is not a torch.compile backend; choose one of {listed}")
    return backend


def compile_backbone(model: nn.Module, backend: str | None) -> None:
    """Compile ``model.model`` (the patched backbone of a ``PatchModule``) in place with ``nn.Module.compile``:
    its parameters and checkpoint keys stay as they are. The first steps (one per task) compile it."""
    if backend is None:
        return
    model.model.compile(backend=backend)
    log.info(f"patched backbone compiled with torch.compile (backend {backend}); the first steps compile it")
