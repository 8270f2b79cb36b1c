"""The LightningModule: a shared backbone, a patch and a head per task, metrics per task."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from modelpatch.data.mixing import Mixing, make_mixing
from modelpatch.data.specs import check_task_names
from modelpatch.models.backbones import Backbone
from modelpatch.models.multitask_forward import forward_mixed
from modelpatch.models.patches import Patch, PatchedBackbone, unmangle
from modelpatch.training.csv_log import CSVLogger
from modelpatch.training.metrics import TaskMeanAccuracy, TaskTrainStats
from modelpatch.training.optim import OptimConfig, check_optim, make_optimizer, rate, warmup_cosine
from modelpatch.training.state_keys import patch_key

log = logging.getLogger("modelpatch")


@dataclass
class TaskInfo:
    """What the module needs to know of a task: its name, classes, loss weight, training samples and data recipe
    (``spec``, a ``TaskSpec`` as a dict)."""

    name: str
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    loss_weight: float = 1.0
    train_samples: int = 0
    spec: dict = field(default_factory=dict)


class PatchModule(L.LightningModule):
    """Shared backbone + one patch and one head per task.

    Args:
        backbone: the feature extractor (shared by all tasks).
        patch: the resolved patch (``resolve_patch``).
        tasks: one ``TaskInfo`` per task, in order.
        optim: optimizer settings.
        mean, std: input normalization (per channel, for ``[0, 1]`` images).
        train_shared: also train the backbone parameters no patch selects.
        channels_last: hold convolution weights and inputs channels-last (NHWC): a mobilenet_v2
            training step on CPU 1.5x faster for ``bn``, 2.4x for ``full`` (docs/benchmarks.md,
            step-time); the numbers are the same up to float rounding.
        mixing: the task-mixing mode (``modelpatch.data.mixing``), or its name; ``mix_seed`` seeds a named one.
        lean_backward: keep for backward only what the trained parameters' gradients read
            (``memory.use_memory_savers``: frozen convolutions and frozen-statistics BatchNorm keep
            no input, ReLUs a mask): the same gradients, a fraction of the activation memory. ``"auto"``:
            on the CPU only the ReLU savers (the others cost time there), elsewhere those and the convolutions'.
        meta: plain data saved as hyper-parameters (the run's config), for the record.
    """

    def __init__(
        self,
        backbone: Backbone,
        patch: Patch,
        tasks: Sequence[TaskInfo],
        *,
        optim: OptimConfig | None = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        train_shared: bool = False,
        mixing: str | Mixing = "all",
        mix_seed: int = 0,
        channels_last: bool = False,
        lean_backward: bool | str = "auto",
        meta: Mapping | None = None,
    ):
        super().__init__()
        check_task_names([t.name for t in tasks])
        self.tasks = {t.name: t for t in tasks}
        self.mixing = mixing if isinstance(mixing, Mixing) else make_mixing(mixing, seed=mix_seed)
        self.frozen_tasks: set[str] = set()
        self.inputs_are_features = False  # asked of the datamodule in setup()
        self.optim = optim or OptimConfig()
        check_optim(self.optim)
        self.model = PatchedBackbone(
            backbone, patch, self.tasks, train_shared=train_shared, lean_backward=lean_backward
        )
        self.heads = nn.ModuleDict({t.name: nn.Linear(backbone.num_features, t.num_classes) for t in tasks})
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)
        self.train_stats = TaskTrainStats(len(tasks))
        self.val_acc = self._accuracies()
        self.test_acc = self._accuracies()
        self.val_mean_acc = TaskMeanAccuracy(len(tasks))
        self.test_mean_acc = TaskMeanAccuracy(len(tasks))
        self.val_acc_best = MaxMetric()  # best val/acc so far: what ModelCheckpoint keeps and tests
        self.last_train_epoch: dict[str, torch.Tensor] | None = None
        self.save_hyperparameters(
            {
                "backbone": {
                    "name": backbone.name,
                    "width_mult": backbone.width_mult,
                    "num_features": backbone.num_features,
                    "weights": backbone.weights_source,
                    "transform_input": backbone.transform_input,
                },
                "patch": {"kind": patch.kind, "norm_stats": patch.norm_stats, "train_shared": train_shared},
                "tasks": [asdict(t) for t in tasks],
                "mixing": self.mixing.name,
                "channels_last": channels_last,
                "lean_backward": lean_backward,
                "optim": asdict(self.optim),
                "mean": list(mean),
                "std": list(std),
                **({"meta": dict(meta)} if meta else {}),
            }
        )

    def _accuracies(self) -> nn.ModuleDict:
        return nn.ModuleDict({n: MulticlassAccuracy(t.num_classes, average="micro") for n, t in self.tasks.items()})

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def patch(self) -> Patch:
        return self.model.patch

    @property
    def backbone(self) -> Backbone:
        """The shared backbone (``self.model`` is the backbone with every task's patch)."""
        return self.model.backbone

    @property
    def patches(self) -> nn.ModuleDict:
        """Each task's ``TaskPatch``, by task name."""
        return self.model.patches

    @property
    def trainable_tasks(self) -> list[str]:
        return [t for t in self.tasks if t not in self.frozen_tasks]

    def freeze_tasks(self, names: Sequence[str]) -> None:
        """Keep these tasks' patches and heads as they are (sequential transfer)."""
        for name in names:
            self.frozen_tasks.add(name)
            for p in [*self.model.patches[name].parameters(), *self.heads[name].parameters()]:
                p.requires_grad_(False)

    # --- forward ---------------------------------------------------------------------------

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images, 1 or 3 channels -> normalized float, 3 channels."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def features(self, images: torch.Tensor, task: str) -> torch.Tensor:
        return self.model(self.prepare(images), task)

    def forward(self, images: torch.Tensor, task: str) -> torch.Tensor:
        """Logits of ``task``'s head on ``task``'s patched backbone (or on cached features)."""
        if self.inputs_are_features:
            return self.heads[task](images)
        return self.heads[task](self.features(images, task))

    def forward_mixed(self, images: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        """Logits for a batch whose sample ``i`` belongs to task ``tasks[i]``, in one backbone pass.

        Returns:
            ``[N, max classes]``; columns past a task's own class count are ``-inf``.
        """
        if len(tasks) != len(images):
            raise ValueError(f"got {len(images)} images but {len(tasks)} task names")
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise KeyError(f"unknown task(s) {', '.join(unknown)}; this model serves {', '.join(self.tasks)}")
        order = list(dict.fromkeys(tasks))
        index = torch.tensor([order.index(t) for t in tasks], device=images.device)
        feats = forward_mixed(self.model, self.prepare(images), index, order)
        out = feats.new_full((len(tasks), max(self.tasks[t].num_classes for t in order)), float("-inf"))
        for i, task in enumerate(order):
            rows = index == i
            out[rows, : self.tasks[task].num_classes] = self.heads[task](feats[rows])
        return out

    # --- steps -----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self.inputs_are_features = bool(getattr(datamodule, "features_cached", False))

    def tasks_for_step(self, available: Sequence[str]) -> list[str]:
        """The tasks this step trains: the trainable ones in its batch (the mixing mode decides which tasks'
        batches a step loads, ``data.mixing``)."""
        return [t for t in self.trainable_tasks if t in available]

    def loss_scale(self, task: str) -> float:
        """The factor of ``task``'s loss under DDP (``Mixing.loss_scale``)."""
        return self.mixing.loss_scale(task, self.trainable_tasks, self.trainer.world_size)

    def on_fit_start(self) -> None:
        self.mixing.rank_tasks(self.trainable_tasks, self.trainer.world_size)  # fail early (too few devices)
        loggers = self.loggers
        if self.trainer.ckpt_path:
            log.info(f"resuming from {self.trainer.ckpt_path}")
            loggers = [lg for lg in loggers if not isinstance(lg, CSVLogger)]  # its rows before the checkpoint stay
        counts = {f"params/{k}": float(v) for k, v in self.parameter_counts().items()}
        for logger in loggers:
            logger.log_metrics(counts, step=0)

    def on_validation_epoch_start(self) -> None:
        self.sync_task_statistics()

    def on_test_epoch_start(self) -> None:
        self.sync_task_statistics()

    def on_validation_epoch_end(self) -> None:
        # Logged here, not per step: one key fed by several dataloaders is refused by Lightning.
        if not self.trainer.sanity_checking:  # the sanity check's validation does not count
            self.val_acc_best.update(self.val_mean_acc.compute())
            self.log("val/acc_best", self.val_acc_best.compute())
        self.log("val/acc", self.val_mean_acc, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_mean_acc)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Every rank builds the checkpoint (Lightning's dump_checkpoint), so this collective is safe here;
        # rank 0 then writes statistics all ranks agree on, also in a mid-epoch checkpoint.
        synced = self.sync_task_statistics()
        state = checkpoint.get("state_dict")
        if synced and state is not None:
            state.update({k: v.detach().clone() for k, v in synced.items() if k in state})

    @torch.no_grad()
    def sync_task_statistics(self) -> dict[str, torch.Tensor]:
        """Make every rank hold the same per-task normalization statistics: each task's are averaged over
        the ranks that train it (all ranks, or under ``per_device`` those given the task).

        Returns:
            The synced buffers by state-dict key (none outside DDP).
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return {}
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if world == 1:
            return {}
        synced = {}
        for task in self.trainable_tasks:
            ranks = self.mixing.ranks_of(task, self.trainable_tasks, world)
            for name, buf in self.model.patches[task].named_buffers():
                if buf.is_floating_point():
                    total = buf.clone() if rank in ranks else torch.zeros_like(buf)
                    torch.distributed.all_reduce(total)
                    buf.copy_(total.div_(len(ranks)))
                else:  # counts (num_batches_tracked): the first trainer's
                    torch.distributed.broadcast(buf, src=ranks[0])
                synced[patch_key(task, unmangle(name))] = buf
        return synced

    def training_step(self, batch: Mapping[str, tuple[torch.Tensor, torch.Tensor]], batch_idx: int):
        total = 0.0
        for task in self.tasks_for_step(list(batch)):
            images, labels = batch[task]
            logits = self(images, task)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.optim.label_smoothing)
            total = total + self.tasks[task].loss_weight * self.loss_scale(task) * loss
            self.train_stats.update(loss, logits.argmax(-1), labels, self.task_names.index(task))
        if self._log_step_loss():
            self.log("train/loss", total, prog_bar=True, batch_size=1)
        return total

    def _log_step_loss(self) -> bool:
        """Per-step loss for the progress bar when there is one, else only on the steps loggers write
        (Lightning writes when the count of optimizer steps + 1 is a multiple of ``log_every_n_steps``)."""
        every = self.trainer.log_every_n_steps
        return self.trainer.progress_bar_callback is not None or (every > 0 and (self.global_step + 1) % every == 0)

    def on_train_epoch_end(self) -> None:
        self.last_train_epoch = self.train_epoch_metrics()  # kept for a checkpoint of the epoch's end
        for key, value in self.last_train_epoch.items():
            self.log(key, value, rank_zero_only=True)

    def train_epoch_metrics(self) -> dict[str, torch.Tensor]:
        """Each trained task's mean loss and accuracy over the epoch; the sums start over. ``compute()`` syncs
        across ranks, so every rank calls this, trained tasks or not (the values are then the same on all)."""
        # reshape: torchmetrics squeezes one-element results (one task) to 0-d tensors
        losses, accs, totals = (t.reshape(-1) for t in self.train_stats.compute())
        self.train_stats.reset()
        out = {}
        for i, task in enumerate(self.task_names):
            if totals[i] > 0:
                out.update({f"train/{task}/loss": losses[i], f"train/{task}/acc": accs[i]})
        return out

    def _eval_step(self, stage: str, batch, dataloader_idx: int) -> None:
        images, labels = batch
        task = self.task_names[dataloader_idx]
        logits = self(images, task)
        preds = logits.argmax(-1)
        acc = getattr(self, f"{stage}_acc")[task]
        mean_acc = getattr(self, f"{stage}_mean_acc")
        acc.update(preds, labels)
        mean_acc.update(preds, labels, dataloader_idx)
        self.log(
            f"{stage}/{task}/loss", F.cross_entropy(logits, labels), batch_size=len(labels), add_dataloader_idx=False
        )
        self.log(f"{stage}/{task}/acc", acc, add_dataloader_idx=False)

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
        counts["total"] = counts["shared"] + sum(counts[f"{t}/patch"] + counts[f"{t}/head"] for t in self.task_names)
        counts["trainable"] = _numel(p for p in self.parameters() if p.requires_grad)
        # K separately fine-tuned models: a whole backbone and a head per task.
        counts["separate_models"] = sum(counts["backbone"] + counts[f"{t}/head"] for t in self.task_names)
        return counts

    def configure_optimizers(self):
        o = self.optim
        groups = [
            {
                "name": "patch",
                "params": list(self.model.patches.parameters()),
                "lr": rate(o.patch_lr, o.lr),
                "weight_decay": o.patch_weight_decay,
            },
            {
                "name": "head",
                "params": list(self.heads.parameters()),
                "lr": rate(o.head_lr, o.lr),
                "weight_decay": o.weight_decay,
            },
        ]
        if self.model.train_shared:
            groups.append(
                {
                    "name": "shared",
                    "params": [p for p in self.model.shared_parameters() if p.requires_grad],
                    "lr": rate(o.shared_lr, o.lr),
                    "weight_decay": o.weight_decay,
                }
            )
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        groups = [g for g in groups if g["params"]]
        optimizer = make_optimizer(groups, o)
        if o.scheduler == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(total, round(o.warmup_epochs * self.steps_per_epoch()))
        scheduler = warmup_cosine(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch, as the trainer runs them (``limit_train_batches`` and
        gradient accumulation counted; call after ``estimated_stepping_batches`` has set up the data)."""
        batches = self.trainer.num_training_batches
        if batches == float("inf"):
            raise ValueError("optim.warmup_epochs needs a training loader with a length; set optim.warmup_epochs=0")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))


def _numel(params) -> int:
    return sum(p.numel() for p in params)
