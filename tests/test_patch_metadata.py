"""Patch file metadata: every field is covered by a checksum, and files that normalize inputs
differently are not served by one model."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelpatch.files.patch_files import PatchFileError, export_patches, read_patch_file
from modelpatch.files.patched_model import load_patched_model

from .support import tiny_model

# Realistic edits of the fields that change outputs; every other field gets a trailing space.
EDITS = {
    "mean": "[0.4, 0.5, 0.5]",
    "std": "[0.25, 0.5, 0.5]",
    "classes": '["1", "0", "2"]',
    "channels_last": "true",
    "input_size": "64",
}


def rewrite(src, dst, edit):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_every_metadata_field_is_covered(tmp_path):
    path = export_patches(tiny_model("bn"), tmp_path)["a"]
    meta = read_patch_file(path).meta
    spec = dict(meta["task_spec"], input_size=64)
    edits = {**EDITS, "task_spec": json.dumps(spec)}
    with safe_open(str(path), framework="pt") as f:
        fields = sorted(k for k in f.metadata() if k != "meta_sha256")
    assert {"mean", "std", "classes", "task_spec", "channels_last", "fingerprint", "tensors_sha256"} <= set(fields)
    for field in fields:

        def edit(m, field=field):
            m[field] = edits.get(field, m[field] + " ")

        edited = rewrite(path, tmp_path / f"edited_{field}.safetensors", edit)
        # format and format_version are checked first, each with its own message naming the value
        message = {"format": "format='modelpatch-patch '", "format_version": "format version 2 ;"}.get(
            field, rf"metadata field\(s\) {field} do not match their checksum"
        )
        with pytest.raises(PatchFileError, match=message):
            read_patch_file(edited)
    removed = rewrite(path, tmp_path / "removed.safetensors", lambda m: m.pop("mean"))
    with pytest.raises(PatchFileError, match=r"field\(s\) mean do not match"):
        read_patch_file(removed)
    added = rewrite(path, tmp_path / "added.safetensors", lambda m: m.update(note="x"))
    with pytest.raises(PatchFileError, match=r"field\(s\) note do not match"):
        read_patch_file(added)
    unsigned = rewrite(path, tmp_path / "unsigned.safetensors", lambda m: m.pop("meta_sha256"))
    with pytest.raises(PatchFileError, match="metadata checksum is unreadable"):
        read_patch_file(unsigned)


def test_version_1_files_are_still_read(tmp_path):
    path = export_patches(tiny_model("bn"), tmp_path)["a"]

    def as_version_1(m):
        m["format_version"] = "1"
        for key in ("meta_sha256", "transform_input"):
            m.pop(key, None)

    old = rewrite(path, tmp_path / "v1.safetensors", as_version_1)
    assert read_patch_file(old).meta["mean"] == read_patch_file(path).meta["mean"]


def test_files_with_different_input_normalization_are_not_served_together(tmp_path):
    model = tiny_model("bn")
    first = export_patches(model, tmp_path / "one")["a"]
    with torch.no_grad():
        model.mean.fill_(0.25)
    second = export_patches(model, tmp_path / "two")["b"]
    assert read_patch_file(first).meta["fingerprint"] == read_patch_file(second).meta["fingerprint"]
    with pytest.raises(PatchFileError, match=r"differ in mean \(\[0\.25, 0\.25, 0\.25\] vs \[0\.5, 0\.5, 0\.5\]\)"):
        load_patched_model([first, second])
    served = load_patched_model([first, tmp_path / "one" / "b.safetensors"])  # one normalization: served
    assert served.task_names == ["a", "b"]
