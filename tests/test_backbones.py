"""Backbones: every builder, its feature width, and each way of loading weights."""

import re
from urllib.error import URLError

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from modelpatch.models.backbones import BackboneError, fingerprint, list_backbones, pretrained_weights_file
from modelpatch.training.weights import load_backbone

from .support import reference_state_dict


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_is_a_feature_extractor(name):
    backbone = load_backbone(name, width=0.25 if name == "mobilenet_v2" else 1.0).eval()
    size = 75 if name == "inception_v3" else 32  # Inception's stem needs 75x75
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, size, size))
    assert out.shape == (2, backbone.num_features)


@pytest.mark.parametrize(
    ("name", "weights", "file"),
    [
        ("inception_v3", "imagenet", "inception_v3_google-0cc3c7bd.pth"),
        ("ssdlite_mobilenet_v3", "coco", "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"),
    ],
)
def test_pretrained_files_of_the_paper_backbones_load_from_the_cache(tmp_path, monkeypatch, name, weights, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = reference_state_dict(name)
    path = tmp_path / "hub" / "checkpoints" / file
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    backbone = load_backbone(name, weights=weights)
    assert backbone.weights_source == weights
    loaded = backbone.state_dict()
    prefix = "body.0." if name == "ssdlite_mobilenet_v3" else "body."
    source_prefix = "backbone.features." if name == "ssdlite_mobilenet_v3" else ""
    compared = 0
    for key, value in state.items():
        if key.startswith(source_prefix) and not key.startswith(("AuxLogits", "fc.")):
            target = prefix + key.removeprefix(source_prefix)
            assert torch.equal(loaded[target], value), key
            compared += 1
    assert compared == len(loaded)
    with pytest.raises(BackboneError, match="weights 'coco', not 'imagenet'"):
        load_backbone("ssdlite_mobilenet_v3", weights="imagenet")


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(BackboneError, match=r"unknown backbone 'vgg'.*mobilenet_v2.*resnet18"):
        load_backbone("vgg")


def test_width_only_where_the_model_has_one():
    assert load_backbone("mobilenet_v2", width=0.5).num_features == 1280  # last layer is never thinned
    with pytest.raises(BackboneError, match=r"resnet18.*no width multiplier.*mobilenet_v2"):
        load_backbone("resnet18", width=0.5)


def test_imagenet_weights_load_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.mobilenet_v2()
    path = pretrained_weights_file("mobilenet_v2")
    assert path == tmp_path / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    backbone = load_backbone("mobilenet_v2", weights="imagenet")
    assert backbone.weights_source == "imagenet"
    torch.testing.assert_close(backbone.body.features[0][0].weight, reference.features[0][0].weight)


def test_imagenet_weights_offline_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    with pytest.raises(BackboneError, match=re.escape(f"copy it to {expected}")):
        load_backbone("resnet18", weights="imagenet")


def test_imagenet_weights_refuse_other_widths_and_normalization():
    with pytest.raises(BackboneError, match=r"width 1\.0 only"):
        load_backbone("mobilenet_v2", weights="imagenet", width=0.5)
    with pytest.raises(BackboneError, match="expect input mean"):
        load_backbone("resnet18", weights="imagenet", mean=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_plain_state_dicts_load_with_or_without_the_head(tmp_path, suffix):
    source = torchvision.models.resnet18()
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    backbone = load_backbone("resnet18", weights=path)
    torch.testing.assert_close(backbone.body.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert fingerprint(backbone) != fingerprint(load_backbone("resnet18"))


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(BackboneError, match=r"does not fit backbone mobilenet_v2.*missing.*unexpected"):
        load_backbone("mobilenet_v2", weights=path)
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("resnet18", weights=tmp_path / "nope.pt")


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state": torchvision.models.resnet18()}, path)  # a whole module: needs unpickling
    with pytest.raises(BackboneError, match=r"evil.pt.* is not a checkpoint torch can read safely.*weights_only=True"):
        load_backbone("resnet18", weights=path)
