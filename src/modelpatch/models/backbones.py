"""Backbones: torchvision classifiers turned into feature extractors ``x -> [N, num_features]``.

A backbone knows nothing of patches, tasks or files. Its weights are a value: ``None`` (random init),
``"imagenet"`` / ``"coco"`` (torchvision's weights, read from the torch hub cache) or a state dict (reading one
from a file is ``training.weights``' job).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from modelpatch.config import ConfigError
from modelpatch.models.state_dicts import compare_keys, hash_tensors


class BackboneError(ConfigError):
    """A backbone or its weights cannot be built as configured."""


@dataclass(frozen=True)
class BackboneSpec:
    """Where a torchvision model keeps its final linear layer (removed to expose features).

    ``pretrained`` names the weights value that loads torchvision's pretrained weights for it
    (``imagenet`` for classifiers; ``coco`` for a detector's feature extractor).
    """

    final_linear: str | None
    accepts_width: bool = False
    pretrained: str = "imagenet"


# The final Linear is replaced by Identity; what comes before it (pooling, and for some models
# a norm or a hidden Linear) stays, so forward() returns the penultimate features.
BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec("classifier.1", accepts_width=True),
    "mobilenet_v3_small": BackboneSpec("classifier.3"),
    "mobilenet_v3_large": BackboneSpec("classifier.3"),
    "resnet18": BackboneSpec("fc"),
    "resnet50": BackboneSpec("fc"),
    "efficientnet_b0": BackboneSpec("classifier.1"),
    "convnext_tiny": BackboneSpec("classifier.2"),
    "inception_v3": BackboneSpec("fc"),
    # The feature extractor of torchvision's SSDLite detector, pooled: the paper's detector-to-
    # classifier study. Its pretrained weights are the detector's (COCO).
    "ssdlite_mobilenet_v3": BackboneSpec(None, pretrained="coco"),
}

PRETRAINED = ("imagenet", "coco")  # weights values that mean "torchvision's pretrained weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A torchvision model without its final linear layer.

    Args:
        name: key of ``BACKBONES``.
        body: the torchvision model, final linear already replaced by ``nn.Identity``.
        num_features: size of the feature vector ``forward`` returns.
        width_mult: the model's width multiplier (``backbone.width``; 1.0 where the model has none).
    """

    def __init__(self, name: str, body: nn.Module, num_features: int, width_mult: float = 1.0):
        super().__init__()
        self.name = name
        self.body = body
        self.num_features = num_features
        self.width_mult = width_mult
        self.weights_source = "random"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @property
    def transform_input(self) -> bool | None:
        """InceptionV3's input rescaling (on for torchvision's pretrained weights): part of the function
        but not of the state dict, so files record it beside the weights; ``None`` for other models."""
        value = getattr(self.body, "transform_input", None)
        return None if value is None else bool(value)

    def restore_transform_input(self, value: bool | None) -> None:
        """Set the rescaling a weights file recorded (``None``: the file did not say; keep it)."""
        if value is not None and self.transform_input is not None:
            self.body.transform_input = bool(value)


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def check_backbone_name(name: str) -> None:
    """Refuse a name that is not in ``BACKBONES``, listing those that are."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}")


def build_backbone(
    name: str,
    *,
    weights: str | Mapping[str, torch.Tensor] | None = None,
    width: float = 1.0,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    source: str = "state dict",
) -> Backbone:
    """Build a feature extractor from torchvision and load its weights.

    Args:
        name: one of ``list_backbones()``.
        weights: ``None`` (random), a name of ``PRETRAINED`` (torchvision's weights), or a state dict
            (keys with or without ``body.`` and torchvision's head; ``load_backbone_state``).
        width: width multiplier (``backbone.width``; ``mobilenet_v2`` only).
        mean, std: input normalization; with torchvision's weights they must match the weights'.
        source: where a state dict came from (``weights_source`` and messages).

    Returns:
        The backbone, with ``num_features`` and ``weights_source`` set.
    """
    check_backbone_name(name)
    if weights is not None and not isinstance(weights, Mapping) and weights not in PRETRAINED:
        raise BackboneError(f"weights={weights!r}: pass null, {' or '.join(PRETRAINED)}, or a state dict")
    spec = BACKBONES[name]
    if width != 1.0 and not spec.accepts_width:
        raise BackboneError(
            f"backbone {name!r} has no width multiplier (got width={width}); only "
            f"{', '.join(n for n, s in sorted(BACKBONES.items()) if s.accepts_width)} take one"
        )
    pretrained = weights in PRETRAINED
    if pretrained and weights != spec.pretrained:
        raise BackboneError(f"{name} has torchvision weights {spec.pretrained!r}, not {weights!r}")
    if pretrained and width != 1.0:
        raise BackboneError(f"torchvision has {weights} weights for {name} at width 1.0 only, got {width}")
    if pretrained:
        _check_normalization(name, mean, std)
    model = _torchvision_model(name, width=width, pretrained=pretrained)
    if spec.final_linear is None:
        features = _feature_width(model)
    else:
        features = model.get_submodule(spec.final_linear).in_features
        _replace_submodule(model, spec.final_linear, nn.Identity())
    backbone = Backbone(name, model, num_features=features, width_mult=width)
    if pretrained:
        backbone.weights_source = str(weights)
    elif weights is not None:
        load_backbone_state(backbone, weights, source=source)
    return backbone


def _torchvision_model(name: str, *, width: float, pretrained: bool) -> nn.Module:
    """The torchvision model for ``name``, with its pretrained weights loaded if asked."""
    if name == "ssdlite_mobilenet_v3":
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large

        detector = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
        if pretrained:
            detector.load_state_dict(load_pretrained_state_dict(name))
        return nn.Sequential(detector.backbone.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    kwargs: dict = {"width_mult": width} if BACKBONES[name].accepts_width else {}
    if name == "inception_v3":
        # torchvision's pretrained Inception carries an auxiliary head and rescales its input.
        kwargs = {"aux_logits": pretrained, "transform_input": pretrained, "init_weights": not pretrained}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if pretrained:
        model.load_state_dict(load_pretrained_state_dict(name))
    if name == "inception_v3":
        model.aux_logits, model.AuxLogits = False, None
    return model


@torch.no_grad()
def _feature_width(model: nn.Module) -> int:
    was_training = model.training
    width = model.eval()(torch.zeros(1, 3, 64, 64)).shape[-1]
    model.train(was_training)
    return int(width)


def _weights_enum(name: str):
    if name == "ssdlite_mobilenet_v3":
        return torchvision.models.detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1
    return torchvision.models.get_model_weights(name).DEFAULT


def pretrained_weights_file(name: str) -> Path:
    """Where torchvision keeps the pretrained weights of ``name`` in the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_weights_enum(name).url)


def load_pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Torchvision's pretrained weights for ``name`` from the torch hub cache; if missing, downloaded
    (when online) and checked against the hash in the file name."""
    enum = _weights_enum(name)
    path = pretrained_weights_file(name)
    try:
        return enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as err:
        if path.exists():  # in the cache, but unreadable: not a download problem
            raise
        raise BackboneError(
            f"pretrained weights for {name} are not in the torch hub cache and could not be "
            f"downloaded ({err}). Fetch {enum.url} on a machine with internet access and "
            f"copy it to {path} (set TORCH_HOME to use another cache folder)."
        ) from err


def _check_normalization(name: str, mean, std) -> None:
    for label, given, expected in (("mean", mean, IMAGENET_MEAN), ("std", std, IMAGENET_STD)):
        if given is not None and not torch.allclose(torch.tensor(list(given)), torch.tensor(expected)):
            raise BackboneError(
                f"{name} ImageNet weights expect input {label} {list(expected)}, "
                f"but backbone.{label}={list(given)}; drop the override or use weights=null"
            )


def _replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def load_backbone_state(
    backbone: Backbone, state: Mapping[str, torch.Tensor], *, source: str, transform_input: bool | None = None
) -> None:
    """Load a state dict (with or without ``body.`` and torchvision's head) and the ``transform_input`` that
    goes with it into ``backbone``; any missing, unexpected or mis-shaped key is an error naming them."""
    if not any(k.startswith("body.") for k in state):
        state = {f"body.{k}": v for k, v in state.items()}
    # A full torchvision state dict still holds the final layer this backbone removed.
    spec = BACKBONES[backbone.name]
    if spec.final_linear is not None:
        state = {k: v for k, v in state.items() if not k.startswith(f"body.{spec.final_linear}.")}
    mismatch = compare_keys(backbone.state_dict(), state)
    if mismatch:
        raise BackboneError(
            f"{source} does not fit backbone {backbone.name} (width {backbone.width_mult}): {mismatch.describe()}; "
            "check backbone= and backbone.width= against the run that made the file"
        )
    backbone.load_state_dict(state)
    backbone.restore_transform_input(transform_input)
    backbone.weights_source = source


def fingerprint(module: nn.Module) -> str:
    """A short hash of every tensor in ``module``'s state dict (names, shapes and values), and of
    InceptionV3's ``transform_input`` (a function of the same tensors, another function)."""
    digest = hashlib.sha256()
    transform_input = getattr(module, "transform_input", None)
    if transform_input is not None:
        digest.update(f"transform_input={transform_input}".encode())
    return hash_tensors(module.state_dict(), digest, dtypes=False).hexdigest()[:16]
