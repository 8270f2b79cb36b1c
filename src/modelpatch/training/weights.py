"""Backbone weights from a file: a checkpoint made by this platform, a ``.safetensors`` file, or a plain state
dict saved with ``torch.save`` (read with ``weights_only=True``: nothing is unpickled)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors

from modelpatch.models.backbones import PRETRAINED, Backbone, BackboneError, build_backbone, check_backbone_name
from modelpatch.training.checkpoints import backbone_state_from_checkpoint, transform_input_from_hparams


def read_backbone_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool | None]:
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


def load_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    width: float = 1.0,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Backbone:
    """``models.backbones.build_backbone`` with the weights a config names: ``None`` (random), a name of
    ``PRETRAINED``, or a path to a weights file (``read_backbone_weights``)."""
    check_backbone_name(name)
    if weights is None or (isinstance(weights, str) and weights in PRETRAINED):
        return build_backbone(name, weights=weights, width=width, mean=mean, std=std)
    state, transform_input = read_backbone_weights(weights)
    backbone = build_backbone(name, weights=state, width=width, mean=mean, std=std, source=str(weights))
    backbone.restore_transform_input(transform_input)
    return backbone
