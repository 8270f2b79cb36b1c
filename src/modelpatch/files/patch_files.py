"""Patch files: a task's patch and head on their own, written and read back verified.

A patch file is ``<task>.safetensors`` with tensors ``patch.<backbone name>`` (patched
parameters), ``stats.<backbone name>`` (normalization statistics the task owns) and
``head.weight`` / ``head.bias``, plus string metadata: what base it fits (backbone, width,
fingerprint of the base weights), the patch kind, the task (its data recipe, classes, input size,
normalization) and the test accuracy it reached, each field covered by a checksum (``meta_sha256``),
as the tensors are (``tensors_sha256``). Writes are atomic; reads never unpickle. Loading patch files into a
model: ``files.patched_model``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from modelpatch.atomic import atomic_write
from modelpatch.models.backbones import PRETRAINED, Backbone, fingerprint
from modelpatch.models.state_dicts import hash_tensors
from modelpatch.training.module import PatchModule

FORMAT_VERSION = "2"  # 2: metadata covered by checksums (``meta_sha256``); 1 (tensors only) is still read
BASE_FILE = "base.safetensors"


class PatchFileError(ValueError):
    """A patch file is unreadable, tampered with, or does not fit the base it is applied to."""


@dataclass
class PatchFile:
    """A patch file's content: tensors by kind, and its metadata (JSON values decoded)."""

    path: Path
    params: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    meta: dict

    @property
    def task(self) -> str:
        return self.meta["task"]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The ``tensors_sha256`` of a patch file: names, dtypes, shapes and bytes of its tensors."""
    return hash_tensors(tensors).hexdigest()


def metadata_digests(meta: dict[str, str]) -> dict[str, str]:
    """A short sha256 of each metadata value: a patch file records them (``meta_sha256``) so that an
    edited field is refused by name."""
    return {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in sorted(meta.items()) if k != "meta_sha256"}


def check_metadata(path: Path, meta: dict[str, str]) -> None:
    """Refuse a patch file whose metadata was edited, added to or cut after it was written."""
    try:
        recorded = json.loads(meta["meta_sha256"])
    except (KeyError, json.JSONDecodeError) as err:
        raise PatchFileError(f"{path} was modified after it was written: its metadata checksum is unreadable") from err
    actual = metadata_digests(meta)
    changed = sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))
    if changed:
        raise PatchFileError(
            f"{path} was modified after it was written: metadata field(s) {', '.join(changed)} do not match "
            "their checksum (edited, added or removed); re-export the patch from its run"
        )


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (a crash leaves the old file or the new one, never half)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=True)


def base_metadata(backbone: Backbone) -> dict[str, str]:
    return {
        "format": "modelpatch-base",
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "width": json.dumps(backbone.width_mult),
        "fingerprint": fingerprint(backbone),
        "transform_input": json.dumps(backbone.transform_input),
    }


def task_tensors(model: PatchModule, task: str) -> dict[str, torch.Tensor]:
    """What ``task``'s patch file holds: its patch, the statistics it owns and its head, by file key."""
    own = model.patches[task].tensors()
    tensors = {f"patch.{n}": own[n] for n in model.patch.params}
    tensors.update({f"stats.{n}": own[n] for n in model.patch.buffers})
    tensors.update({f"head.{n}": p for n, p in model.heads[task].named_parameters()})
    return tensors


def patch_bytes(model: PatchModule, task: str) -> int:
    """Bytes of ``task``'s patch file tensors (patch, owned statistics, head; metadata not counted)."""
    return sum(t.numel() * t.element_size() for t in task_tensors(model, task).values())


def export_task_patch(
    model: PatchModule, task: str, path: str | Path, *, test_acc: float | None = None, base_weights: str = ""
) -> Path:
    """Write ``task``'s patch, owned statistics and head to ``path`` (atomically)."""
    backbone = model.backbone
    patch = model.patch
    tensors = task_tensors(model, task)
    head = model.tasks[task]
    spec = dict(head.spec)
    spec.pop("options", None)
    meta = {
        **base_metadata(backbone),
        "format": "modelpatch-patch",
        "features": json.dumps(backbone.num_features),
        "base_weights": base_weights or backbone.weights_source,
        "patch": patch.kind,
        "norm_stats": patch.norm_stats,
        "task": task,
        "task_spec": json.dumps(spec),
        "classes": json.dumps(head.class_names),
        "num_classes": json.dumps(head.num_classes),
        "input_size": json.dumps(spec.get("input_size")),
        "mean": json.dumps([float(v) for v in model.mean.flatten()]),
        "std": json.dumps([float(v) for v in model.std.flatten()]),
        "test_acc": json.dumps(test_acc),
        "channels_last": json.dumps(model.channels_last),
        "tensors_sha256": tensors_digest(tensors),
    }
    meta["meta_sha256"] = json.dumps(metadata_digests(meta))
    return atomic_save(tensors, Path(path), meta)


def export_patches(model: PatchModule, out_dir: str | Path, metrics: dict[str, float] | None = None) -> dict[str, Path]:
    """Export every task's patch file into ``out_dir``, and the base when no weights file holds it.

    The base is written (``base.safetensors``) when the shared weights were trained or randomly
    initialized, or come from a multi-task checkpoint (``init_from``); otherwise the patch files name
    the weights they fit (``imagenet`` or a path).
    """
    out_dir = Path(out_dir)
    metrics = metrics or {}
    backbone = model.backbone
    written: dict[str, Path] = {}
    base_weights = backbone.weights_source
    if model.model.train_shared or backbone.weights_source == "random" or "init_from" in model.hparams:
        written["base"] = atomic_save(dict(backbone.state_dict()), out_dir / BASE_FILE, base_metadata(backbone))
        base_weights = BASE_FILE
    for task in model.task_names:
        written[task] = export_task_patch(
            model,
            task,
            out_dir / f"{task}.safetensors",
            test_acc=metrics.get(f"test/{task}/acc"),
            base_weights=base_weights,
        )
    return written


def read_patch_file(path: str | Path) -> PatchFile:
    """Read and verify a patch file (safetensors only: nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise PatchFileError(f"patch file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise PatchFileError(f"{path} is truncated or not a safetensors file ({err})") from err
    if raw_meta.get("format") != "modelpatch-patch":
        raise PatchFileError(f"{path} is not a modelpatch patch file (format={raw_meta.get('format')!r})")
    version = raw_meta.get("format_version")
    if version not in ("1", FORMAT_VERSION):
        raise PatchFileError(f"{path} has format version {version}; this reader knows 1 and {FORMAT_VERSION}")
    if version != "1":  # version 1 files carry no metadata checksum
        check_metadata(path, raw_meta)
    if tensors_digest(tensors) != raw_meta.get("tensors_sha256"):
        raise PatchFileError(f"{path} was modified after it was written: its tensors do not match their checksum")
    meta = dict(raw_meta)
    for key in ("width", "features", "task_spec", "classes", "num_classes", "input_size", "mean", "std", "test_acc"):
        meta[key] = json.loads(raw_meta[key])
    meta["channels_last"] = json.loads(raw_meta.get("channels_last", "false"))  # absent in files of 2026-11-25
    meta["transform_input"] = json.loads(raw_meta.get("transform_input", "null"))  # absent in version 1
    parts = {"patch": {}, "stats": {}, "head": {}}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        parts[kind][rest] = tensor
    return PatchFile(path, parts["patch"], parts["stats"], parts["head"], meta)


def check_fits(backbone: Backbone, pf: PatchFile) -> None:
    """Refuse a patch made for another backbone or other base weights, listing every mismatch."""
    have = {"backbone": backbone.name, "width": backbone.width_mult, "fingerprint": fingerprint(backbone)}
    diffs = [f"{k}: patch file has {pf.meta[k]}, base has {v}" for k, v in have.items() if pf.meta[k] != v]
    if diffs:
        raise PatchFileError(
            f"{pf.path} does not fit this base ({'; '.join(diffs)}); it was made on base weights "
            f"{pf.meta['base_weights']!r}: load those"
        )


def resolve_base(pf: PatchFile, base: str | None) -> str | None:
    """The base weights to build: ``base`` if given, else what the patch file was made on."""
    source = base if base is not None else pf.meta["base_weights"]
    if source in ("random", ""):
        raise PatchFileError(f"{pf.path} was made on randomly initialized weights; pass the run's {BASE_FILE}")
    if source not in PRETRAINED and not Path(source).is_absolute():
        source = str(pf.path.parent / source)
    return source
