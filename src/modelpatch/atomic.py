"""Atomic file writes: a crash (or a concurrent writer) leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """Write ``path`` through ``write(tmp)`` into a temporary file beside it, then rename it into place.

    Args:
        write: writes the whole file at the path it is given.
        fsync: flush the file to disk before the rename (files that must survive a power cut).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}{TMP_SUFFIX}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files ``atomic_write`` left in ``folder`` when its process was killed mid-write (written on
    this machine by a process that no longer runs): half-written, never in place, safe to remove."""
    stale, host = [], socket.gethostname()
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        match = re.fullmatch(rf"\..+\.(\d+)@(.+){re.escape(TMP_SUFFIX)}", tmp.name)
        if match and match.group(2) == host and not _running(int(match.group(1))):
            stale.append(tmp)
    return sorted(stale)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
