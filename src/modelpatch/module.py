"""The LightningModule: a shared backbone, a patch and a head per task, metrics per task."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from modelpatch.backbones import Backbone
from modelpatch.patches import Patch, PatchedBackbone
from modelpatch.tasks import check_task_names


@dataclass
class TaskHead:
    """What the module needs to know of a task."""

    name: str
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    loss_weight: float = 1.0


@dataclass
class OptimConfig:
    """Optimizer and schedule. ``None`` learning rates fall back to ``lr``."""

    name: str = "sgd"
    lr: float = 0.05
    patch_lr: float | None = None
    head_lr: float | None = None
    shared_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    patch_weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0


OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("cosine", "constant")


class TaskMeanAccuracy(Metric):
    """Accuracy of each task, averaged over tasks (the number a sweeper optimizes)."""

    full_state_update = False

    def __init__(self, num_tasks: int):
        super().__init__()
        self.add_state("correct", torch.zeros(num_tasks), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_tasks), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, task_index: int) -> None:
        self.correct[task_index] += (preds == target).sum()
        self.total[task_index] += target.numel()

    def compute(self) -> torch.Tensor:
        seen = self.total > 0
        return (self.correct[seen] / self.total[seen]).mean()


class PatchModule(L.LightningModule):
    """Shared backbone + one patch and one head per task.

    Args:
        backbone: the feature extractor (shared by all tasks).
        patch: the resolved patch (``resolve_patch``).
        tasks: one ``TaskHead`` per task, in order.
        optim: optimizer settings.
        mean, std: input normalization (per channel, for ``[0, 1]`` images).
        train_shared: also train the backbone parameters no patch selects.
        meta: plain data saved as hyper-parameters (the run's config), for the record.
    """

    def __init__(self, backbone: Backbone, patch: Patch, tasks: Sequence[TaskHead], *,
                 optim: OptimConfig | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), train_shared: bool = False,
                 meta: Mapping | None = None):
        super().__init__()
        check_task_names([t.name for t in tasks])
        self.tasks = {t.name: t for t in tasks}
        self.optim = optim or OptimConfig()
        if self.optim.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.optim.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.optim.scheduler not in SCHEDULERS:
            raise ValueError(f"optim.scheduler={self.optim.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        self.model = PatchedBackbone(backbone, patch, self.tasks, train_shared=train_shared)
        self.heads = nn.ModuleDict({t.name: nn.Linear(backbone.width, t.num_classes) for t in tasks})
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)
        self.train_acc = self._accuracies()
        self.val_acc = self._accuracies()
        self.test_acc = self._accuracies()
        self.val_mean_acc = TaskMeanAccuracy(len(tasks))
        self.test_mean_acc = TaskMeanAccuracy(len(tasks))
        self.save_hyperparameters({
            "backbone": {"name": backbone.name, "width": backbone.width, "width_mult": backbone.width_mult},
            "patch": {"kind": patch.kind, "norm_stats": patch.norm_stats, "train_shared": train_shared},
            "tasks": [asdict(t) for t in tasks],
            "optim": asdict(self.optim),
            "mean": list(mean),
            "std": list(std),
            **({"meta": dict(meta)} if meta else {}),
        })

    def _accuracies(self) -> nn.ModuleDict:
        return nn.ModuleDict({n: MulticlassAccuracy(t.num_classes, average="micro") for n, t in self.tasks.items()})

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def patch(self) -> Patch:
        return self.model.patch

    # --- forward ---------------------------------------------------------------------------

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images, 1 or 3 channels -> normalized float, 3 channels."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def features(self, images: torch.Tensor, task: str) -> torch.Tensor:
        return self.model(self.prepare(images), task)

    def forward(self, images: torch.Tensor, task: str) -> torch.Tensor:
        """Logits of ``task``'s head on ``task``'s patched backbone."""
        return self.heads[task](self.features(images, task))

    # --- steps -----------------------------------------------------------------------------

    def training_step(self, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]], batch_idx: int):
        total = 0.0
        for task, (images, labels) in batch.items():
            logits = self(images, task)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.optim.label_smoothing)
            total = total + self.tasks[task].loss_weight * loss
            self.train_acc[task].update(logits.argmax(-1), labels)
            self.log(f"train/{task}/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
            self.log(f"train/{task}/acc", self.train_acc[task], on_step=False, on_epoch=True)
        self.log("train/loss", total, prog_bar=True, batch_size=1)
        return total

    def _eval_step(self, stage: str, batch, dataloader_idx: int) -> None:
        images, labels = batch
        task = self.task_names[dataloader_idx]
        logits = self(images, task)
        preds = logits.argmax(-1)
        acc = getattr(self, f"{stage}_acc")[task]
        mean_acc = getattr(self, f"{stage}_mean_acc")
        acc.update(preds, labels)
        mean_acc.update(preds, labels, dataloader_idx)
        self.log(f"{stage}/{task}/loss", F.cross_entropy(logits, labels), batch_size=len(labels),
                 add_dataloader_idx=False)
        self.log(f"{stage}/{task}/acc", acc, add_dataloader_idx=False)
        self.log(f"{stage}/acc", mean_acc, add_dataloader_idx=False, prog_bar=True)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    # --- parameters and optimizer ----------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts in the paper's vocabulary: the one place they are computed."""
        counts = {
            "backbone": _numel(self.model.backbone.parameters()),
            "shared": _numel(self.model.shared_parameters()),
        }
        for task in self.task_names:
            counts[f"{task}/patch"] = _numel(self.model.patches[task].parameters())
            counts[f"{task}/head"] = _numel(self.heads[task].parameters())
        counts["total"] = counts["shared"] + sum(
            counts[f"{t}/patch"] + counts[f"{t}/head"] for t in self.task_names
        )
        counts["trainable"] = _numel(p for p in self.parameters() if p.requires_grad)
        return counts

    def on_fit_start(self) -> None:
        counts = {f"params/{k}": float(v) for k, v in self.parameter_counts().items()}
        for logger in self.loggers:
            logger.log_metrics(counts, step=0)

    def configure_optimizers(self):
        o = self.optim
        groups = [
            {"name": "patch", "params": list(self.model.patches.parameters()),
             "lr": o.patch_lr or o.lr, "weight_decay": o.patch_weight_decay},
            {"name": "head", "params": list(self.heads.parameters()),
             "lr": o.head_lr or o.lr, "weight_decay": o.weight_decay},
        ]
        if self.model.train_shared:
            groups.append({"name": "shared", "params": [p for p in self.model.shared_parameters() if p.requires_grad],
                           "lr": o.shared_lr or o.lr, "weight_decay": o.weight_decay})
        groups = [g for g in groups if g["params"]]
        if o.name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)
        elif o.name == "rmsprop":
            optimizer = torch.optim.RMSprop(groups, lr=o.lr, momentum=o.momentum)
        elif o.name == "adam":
            optimizer = torch.optim.Adam(groups, lr=o.lr)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr)
        if o.scheduler == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(o.warmup_epochs * total / max(1, self.trainer.max_epochs or 1))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _numel(params) -> int:
    return sum(p.numel() for p in params)
