"""Patch files: save a task's patch and head on their own, apply them to a base, serve K tasks.

A patch file is ``<task>.safetensors`` with tensors ``patch.<backbone name>`` (patched
parameters), ``stats.<backbone name>`` (normalization statistics the task owns) and
``head.weight`` / ``head.bias``, plus string metadata: what base it fits (backbone, width,
fingerprint of the base weights), the patch kind, the task (its data recipe, classes, input size,
normalization) and the test accuracy it reached, each field covered by a checksum (``meta_sha256``),
as the tensors are (``tensors_sha256``). Writes are atomic; reads never unpickle.

    python -m modelpatch.serving info <file.safetensors>...
    python -m modelpatch.serving storage <folder with base.safetensors and patch files>
    python -m modelpatch.serving apply <patch file> --base <weights> --out <merged.safetensors>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from modelpatch.backbones import PRETRAINED, Backbone, build_backbone, fingerprint
from modelpatch.module import PatchModule, TaskHead
from modelpatch.patches import resolve_patch

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
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    """Write a safetensors file so that a crash leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    own = model.model.patches[task].tensors()
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
    backbone = model.model.backbone
    patch = model.patch
    tensors = task_tensors(model, task)
    head = model.tasks[task]
    spec = dict(head.spec)
    spec.pop("options", None)
    meta = {
        **base_metadata(backbone),
        "format": "modelpatch-patch",
        "features": json.dumps(backbone.width),
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
    backbone = model.model.backbone
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


def load_patched_model(
    files: Sequence[str | Path], *, base: str | None = None, channels_last: bool | None = None
) -> PatchModule:
    """One backbone + K patch files -> a model that serves each file's task by name.

    Args:
        files: patch files, all made on the same base with the same patch kind and input normalization.
        base: base weights (``imagenet``, a path); default: the ones the files were made on.
        channels_last: run channels-last (see ``PatchModule``); default: as the first file was trained,
            so its test accuracy is reproduced exactly.
    """
    pfs = [read_patch_file(f) for f in files]
    if not pfs:
        raise PatchFileError("no patch files given")
    first = pfs[0]
    for pf in pfs[1:]:
        same = ("backbone", "width", "fingerprint", "patch", "norm_stats", "mean", "std")
        diffs = [f"{k} ({pf.meta[k]} vs {first.meta[k]})" for k in same if pf.meta[k] != first.meta[k]]
        if diffs:
            raise PatchFileError(
                f"{pf.path} and {first.path} differ in {'; '.join(diffs)}: one model serves files made on one "
                "base with one patch kind and one input normalization; serve them separately"
            )
    tasks = [pf.task for pf in pfs]
    if len(set(tasks)) != len(tasks):
        raise PatchFileError(f"two patch files for the same task: {', '.join(tasks)}")
    backbone = build_backbone(
        first.meta["backbone"],
        weights=resolve_base(first, base),
        width=first.meta["width"],
        mean=first.meta["mean"],
        std=first.meta["std"],
    )
    backbone.restore_transform_input(first.meta["transform_input"])  # the function the patches were trained in
    for pf in pfs:
        check_fits(backbone, pf)
    patch = resolve_patch(backbone, first.meta["patch"], norm_stats=first.meta["norm_stats"], model_name=backbone.name)
    heads = [TaskHead(pf.task, pf.meta["num_classes"], pf.meta["classes"], spec=pf.meta["task_spec"]) for pf in pfs]
    model = PatchModule(
        backbone,
        patch,
        heads,
        mean=first.meta["mean"],
        std=first.meta["std"],
        channels_last=first.meta["channels_last"] if channels_last is None else channels_last,
    )
    for pf in pfs:
        apply_patch_file(model, pf)
    return model.eval()


def apply_patch_file(model: PatchModule, pf: PatchFile) -> None:
    """Copy a patch file's tensors into ``model``'s patch and head for its task, all or nothing."""
    task = pf.task
    own = model.model.patches[task].tensors()
    expected = set(model.patch.params) | set(model.patch.buffers)
    given = set(pf.params) | set(pf.stats)
    head = dict(model.heads[task].named_parameters())
    problems = [f"missing {n}" for n in sorted(expected - given)]
    problems += [f"unexpected {n}" for n in sorted(given - expected)]
    problems += [
        f"{n} has shape {tuple(t.shape)}, expected {tuple(own[n].shape)}"
        for n, t in {**pf.params, **pf.stats}.items()
        if n in own and t.shape != own[n].shape
    ]
    problems += [
        f"head.{n} has shape {tuple(pf.head.get(n, torch.empty(0)).shape)}, expected {tuple(p.shape)}"
        for n, p in head.items()
        if pf.head.get(n) is None or pf.head[n].shape != p.shape
    ]
    if problems:
        raise PatchFileError(f"{pf.path} does not fit the model: {'; '.join(problems[:5])}")
    with torch.no_grad():
        for name, tensor in {**pf.params, **pf.stats}.items():
            own[name].copy_(tensor)
        for name, p in head.items():
            p.copy_(pf.head[name])


def merge(pf: PatchFile, backbone: Backbone) -> dict[str, torch.Tensor]:
    """A standalone state dict for one task: the base with the patch written in, plus the head."""
    check_fits(backbone, pf)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    for name, tensor in {**pf.params, **pf.stats}.items():
        state[name] = tensor
    state.update({f"head.{k}": v for k, v in pf.head.items()})
    return state


def storage_summary(folder: str | Path) -> dict:
    """Bytes on disk of one base + K patch files against K full models (base + head each)."""
    folder = Path(folder)
    base = folder / BASE_FILE
    patches = sorted(p for p in folder.glob("*.safetensors") if p.name != BASE_FILE)
    if not patches:
        raise PatchFileError(f"no patch files in {folder}")
    pfs = [read_patch_file(p) for p in patches]
    if base.exists():
        base_bytes = base.stat().st_size
    else:
        backbone = build_backbone(pfs[0].meta["backbone"], width=pfs[0].meta["width"])
        base_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    per_task = {pf.task: pf.path.stat().st_size for pf in pfs}
    heads = {pf.task: sum(t.numel() * t.element_size() for t in pf.head.values()) for pf in pfs}
    shared = base_bytes + sum(per_task.values())
    separate = sum(base_bytes + heads[t] for t in per_task)
    return {
        "base_bytes": base_bytes,
        "patch_bytes": per_task,
        "base_plus_patches_bytes": shared,
        "separate_models_bytes": separate,
        "ratio": round(shared / separate, 4),
        "tasks": len(per_task),
        "patch": pfs[0].meta["patch"],
        "backbone": pfs[0].meta["backbone"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelpatch.serving", description="Patch files.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a patch file's metadata")
    info.add_argument("files", nargs="+")
    storage = sub.add_parser("storage", help="bytes of base + K patches against K full models")
    storage.add_argument("folder")
    apply = sub.add_parser("apply", help="write a standalone model: base with one patch applied, and its head")
    apply.add_argument("file")
    apply.add_argument("--base", default=None, help="base weights (default: those the patch was made on)")
    apply.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            for f in args.files:
                pf = read_patch_file(f)
                sizes = {k: sum(t.numel() for t in v.values()) for k, v in (("patch", pf.params), ("head", pf.head))}
                print(json.dumps({"file": str(pf.path), "params": sizes, **pf.meta}, indent=2))
        elif args.command == "storage":
            print(json.dumps(storage_summary(args.folder), indent=2))
        else:
            pf = read_patch_file(args.file)
            backbone = build_backbone(pf.meta["backbone"], weights=resolve_base(pf, args.base), width=pf.meta["width"])
            backbone.restore_transform_input(pf.meta["transform_input"])
            meta = {k: v for k, v in pf.meta.items() if isinstance(v, str)}
            atomic_save(merge(pf, backbone), Path(args.out), meta)
            print(f"written: {args.out}")
    except (PatchFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
