"""A model from patch files: K patch files on one base serve K tasks (``load_patched_model``); one patch merged
into its base as a standalone model; the storage of a base and K patches against K models; and the command:

    python -m modelpatch.serving info <file.safetensors>...
    python -m modelpatch.serving storage <folder with base.safetensors and patch files>
    python -m modelpatch.serving apply <patch file> --base <weights> --out <merged.safetensors>
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from modelpatch.files.patch_files import (
    BASE_FILE,
    PatchFile,
    PatchFileError,
    atomic_save,
    check_fits,
    read_patch_file,
    resolve_base,
)
from modelpatch.models.backbones import Backbone
from modelpatch.models.patches import resolve_patch
from modelpatch.models.state_dicts import compare_keys
from modelpatch.training.module import PatchModule, TaskInfo
from modelpatch.training.weights import load_backbone


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
    backbone = load_backbone(
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
    heads = [TaskInfo(pf.task, pf.meta["num_classes"], pf.meta["classes"], spec=pf.meta["task_spec"]) for pf in pfs]
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
    own = model.patches[pf.task].tensors()
    head = dict(model.heads[pf.task].named_parameters())
    expected = {**own, **{f"head.{n}": p for n, p in head.items()}}
    given = {**pf.params, **pf.stats, **{f"head.{n}": t for n, t in pf.head.items()}}
    mismatch = compare_keys(expected, given)
    if mismatch:
        raise PatchFileError(f"{pf.path} does not fit the model: {mismatch.describe()}")
    with torch.no_grad():
        for name, tensor in given.items():
            expected[name].copy_(tensor)


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
        backbone = load_backbone(pfs[0].meta["backbone"], width=pfs[0].meta["width"])
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
            backbone = load_backbone(pf.meta["backbone"], weights=resolve_base(pf, args.base), width=pf.meta["width"])
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
