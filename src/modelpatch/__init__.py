"""modelpatch: parameter-efficient transfer and multi-task learning with model patches."""

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """For the heavy imports of an entry point: cyclic garbage collection would run over and over
    while torch, lightning and their dependencies import, and again over all their objects at exit
    (seconds of a short run, docs/benchmarks.md). What the block made is frozen: never scanned again."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.freeze()
