"""Where ``PatchModule`` keeps the shared backbone and each task's patch in its state dict (and so in every
checkpoint): ``model.backbone.<name>`` and ``model.patches.<task>.<name with "." as "__">``."""

from __future__ import annotations

from modelpatch.models.patches import mangle, unmangle

CKPT_BACKBONE = "model.backbone."
CKPT_PATCHES = "model.patches."


def patch_key(task: str, name: str) -> str:
    """The state-dict key of ``task``'s copy of backbone tensor ``name``."""
    return f"{CKPT_PATCHES}{task}.{mangle(name)}"


def split_patch_key(key: str) -> tuple[str, str]:
    """``(task, backbone tensor name)`` of a patch key (``patch_key``'s inverse)."""
    task, _, mangled = key.removeprefix(CKPT_PATCHES).partition(".")
    return task, unmangle(mangled)


def patch_tasks(keys) -> list[str]:
    """The tasks whose patches a state dict's keys hold, sorted."""
    return sorted({split_patch_key(k)[0] for k in keys if k.startswith(CKPT_PATCHES)})
