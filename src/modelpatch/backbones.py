"""Backbones: torchvision classifiers turned into feature extractors ``x -> [N, width]``.

A backbone knows nothing of patches or tasks. Its weights are a value: ``None`` (random init),
``"imagenet"`` (torchvision's weights, read from the torch hub cache) or a path to a checkpoint
made by this platform or a plain state dict.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from torch import nn

from modelpatch.checkpoints import backbone_state_from_checkpoint


class BackboneError(ValueError):
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
        width: size of the feature vector ``forward`` returns.
        width_mult: the model's width multiplier (1.0 where the model has none).
    """

    def __init__(self, name: str, body: nn.Module, width: int, width_mult: float = 1.0):
        super().__init__()
        self.name = name
        self.body = body
        self.width = width
        self.width_mult = width_mult
        self.weights_source = "random"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    features = forward

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


def build_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    width: float = 1.0,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Backbone:
    """Build a feature extractor from torchvision and load its weights.

    Args:
        name: one of ``list_backbones()``.
        weights: ``None`` (random), ``"imagenet"``, or a path (``.ckpt`` from this platform,
            ``.safetensors``, or a plain ``.pt``/``.pth`` state dict).
        width: width multiplier (``mobilenet_v2`` only).
        mean, std: input normalization; with ImageNet weights they must match the weights'.

    Returns:
        The backbone, with ``width`` (feature size) and ``weights_source`` set.
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}")
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
    backbone = Backbone(name, model, width=features, width_mult=width)
    if pretrained:
        backbone.weights_source = str(weights)
    elif weights is not None:
        load_backbone_weights(backbone, weights)
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


imagenet_weights_file = pretrained_weights_file


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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file, or a torch file with ``weights_only=True``."""
    return read_weights(path)[0]


def transform_input_from_hparams(hp: Mapping) -> bool | None:
    """The ``transform_input`` a modelpatch checkpoint's hyper-parameters record (older checkpoints:
    on when the run started from torchvision's weights)."""
    backbone = hp.get("backbone", {})
    if backbone.get("transform_input") is not None:
        return bool(backbone["transform_input"])
    if backbone.get("name") != "inception_v3":
        return None
    return hp.get("meta", {}).get("config", {}).get("backbone", {}).get("weights") in PRETRAINED


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool | None]:
    """Tensors of a weights file and the ``transform_input`` it records (``None`` where it says nothing)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get("transform_input")
        return load_safetensors(path), None if recorded is None else json.loads(recorded)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's own message (an unpickler's advice to file an issue) says nothing of what was expected
        raise BackboneError(
            f"backbone weights file {str(path)!r} is not a checkpoint torch can read safely ({type(err).__name__}): "
            "expected a modelpatch/Lightning .ckpt, a state dict saved with torch.save (tensors in plain "
            "containers, read with weights_only=True) or a .safetensors file"
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj:
        return backbone_state_from_checkpoint(obj, path), transform_input_from_hparams(obj.get("hyper_parameters", {}))
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{path} holds no state dict (a mapping of names to tensors)")
    return dict(obj), None


def load_backbone_weights(backbone: Backbone, path: str | os.PathLike) -> None:
    """Load a state dict (and the ``transform_input`` it records) into ``backbone``; any missing or
    unexpected key is an error."""
    state, transform_input = read_weights(path)
    if not any(k.startswith("body.") for k in state):
        state = {f"body.{k}": v for k, v in state.items()}
    expected = backbone.state_dict()
    # A full torchvision state dict still holds the final layer this backbone removed.
    spec = BACKBONES[backbone.name]
    if spec.final_linear is not None:
        state = {k: v for k, v in state.items() if not k.startswith(f"body.{spec.final_linear}.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise BackboneError(
            f"{path} does not fit backbone {backbone.name} (width {backbone.width_mult}): "
            + _summarize("missing", missing)
            + _summarize("unexpected", unexpected)
            + _summarize("wrong shape", wrong_shape)
            + "check backbone= and backbone.width= against the run that made the file"
        )
    backbone.load_state_dict(state)
    backbone.restore_transform_input(transform_input)
    backbone.weights_source = str(path)


def _summarize(label: str, keys: list[str], show: int = 3) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - show} more" if len(keys) > show else ""
    return f"{len(keys)} {label} key(s) ({', '.join(keys[:show])}{more}); "


def fingerprint(module: nn.Module) -> str:
    """A short hash of every tensor in ``module``'s state dict (names, shapes and values), and of
    InceptionV3's ``transform_input`` (a function of the same tensors, another function)."""
    digest = hashlib.sha256()
    transform_input = getattr(module, "transform_input", None)
    if transform_input is not None:
        digest.update(f"transform_input={transform_input}".encode())
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
