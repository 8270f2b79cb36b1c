"""InceptionV3's transform_input (on for torchvision's pretrained weights) travels with its weights:
recorded in checkpoints, base files and patch files, restored from each, and part of the fingerprint."""

import pytest
import torch

from modelpatch.files.patch_files import BASE_FILE, atomic_save, base_metadata, export_patches
from modelpatch.files.patched_model import load_patched_model
from modelpatch.models.backbones import fingerprint
from modelpatch.models.patches import resolve_patch
from modelpatch.run import build
from modelpatch.training.module import PatchModule, TaskInfo
from modelpatch.training.weights import load_backbone


@pytest.fixture(scope="module")
def inception():
    """A random inception_v3 with the input rescaling of torchvision's pretrained one."""
    torch.manual_seed(0)
    backbone = load_backbone("inception_v3")
    assert backbone.body.transform_input is False  # random init: torchvision's default
    backbone.body.transform_input = True
    return backbone.eval()


def test_fingerprint_covers_transform_input(inception):
    before = fingerprint(inception)
    inception.body.transform_input = False
    try:
        assert fingerprint(inception) != before
    finally:
        inception.body.transform_input = True


def test_base_file_and_checkpoint_restore_transform_input(inception, tmp_path):
    atomic_save(dict(inception.state_dict()), tmp_path / BASE_FILE, base_metadata(inception))
    loaded = load_backbone("inception_v3", weights=tmp_path / BASE_FILE)
    assert loaded.body.transform_input is True and fingerprint(loaded) == fingerprint(inception)

    model = PatchModule(inception, resolve_patch(inception, "bn"), [TaskInfo("digits", 10, spec={"name": "digits"})])
    assert model.hparams["backbone"].get("transform_input") is True
    ckpt = tmp_path / "one_task.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    assert load_backbone("inception_v3", weights=ckpt).body.transform_input is True


def test_patch_files_serve_the_function_they_were_trained_in(inception, tmp_path):
    model = PatchModule(inception, resolve_patch(inception, "bn"), [TaskInfo("a", 3, spec={"name": "a"})]).eval()
    files = export_patches(model, tmp_path)
    served = load_patched_model([files["a"]])
    assert served.model.backbone.body.transform_input is True
    images = torch.rand(1, 3, 75, 75)
    with torch.no_grad():
        torch.testing.assert_close(served(images, "a"), model(images, "a"))


def test_init_from_restores_transform_input(inception, make_cfg, tmp_path):
    model = PatchModule(inception, resolve_patch(inception, "bn"), [TaskInfo("digits", 10, spec={"name": "digits"})])
    ckpt = tmp_path / "multi.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    cfg = make_cfg(
        "backbone=inception_v3", "backbone.width=1.0", "task=digits", "task.input_size=75", f"init_from={ckpt}"
    )
    _, built = build(cfg)
    assert built.model.backbone.body.transform_input is True
    assert fingerprint(built.model.backbone) == fingerprint(inception)
