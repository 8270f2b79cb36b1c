"""Cached backbone features: with a fixed backbone, every split's images are replaced once by their
features, and the heads train on those (the same computation, far cheaper)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from modelpatch.data.datamodule import TaskDataModule
    from modelpatch.training.module import PatchModule


@torch.no_grad()
def cache_features(datamodule: TaskDataModule, model: PatchModule, batch_size: int = 512) -> None:
    """Replace every split's images by ``model``'s backbone features, computed once; the module asks
    ``datamodule.features_cached`` when it is set up (``PatchModule.setup``).

    Exact only for a fixed backbone (``logits`` patch, frozen statistics, nothing shared trained) and
    in-memory tasks without augmentation: then training the heads on cached features is training on images.
    """
    if not model.model.fixed_backbone:
        raise ValueError(
            f"features can be cached only for a fixed backbone (patch=logits, norm_stats=frozen, "
            f"train_shared=false); this run has patch={model.patch.kind}, norm_stats={model.patch.norm_stats}"
        )
    if not datamodule.cacheable:
        raise ValueError("features can be cached only for in-memory tasks without augment (not streamed from disk)")
    was_training = model.training
    model.eval()
    for name, data in datamodule.data.items():
        for split in (data.train, data.val, data.test):
            chunks = [
                model.features(split.images[i : i + batch_size].to(model.device), name).cpu()
                for i in range(0, len(split.labels), batch_size)
            ]
            split.images = torch.cat(chunks) if chunks else torch.empty(0, model.backbone.num_features)
    model.train(was_training)
    datamodule.features_cached = True
