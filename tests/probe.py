"""A callback the DDP test adds from the command line: records, per rank, which tasks' patches and
heads received gradient, and a digest of every parameter and buffer at the end of training."""

import hashlib
import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from torch import nn


def digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).numpy().tobytes())
    return h.hexdigest()


class DDPProbe(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.grads: dict[str, dict[str, bool]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for task in pl_module.trainable_tasks:
            seen = self.grads.setdefault(task, {"patch": False, "head": False})
            for part, module in (("patch", pl_module.model.patches[task]), ("head", pl_module.heads[task])):
                params = list(module.parameters())
                if params and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params):
                    seen[part] = True

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "grads": self.grads,
            "shared": digest((n, p) for n, p in pl_module.model.backbone.named_parameters()),
            "patches": digest(pl_module.model.patches.state_dict().items()),
            "heads": digest(pl_module.heads.state_dict().items()),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class Preempted(RuntimeError):
    """Raised by ``StepProbe`` to stop a run the way a preemption would (after a checkpoint)."""


class StepProbe(Callback):
    """Records, per rank, what each training step loaded (``steps-rank<r>.json``: epoch, step, and each
    task's labels), the gradients of the first step (``grads-rank<r>.safetensors``, after DDP's
    averaging) and the per-task statistics before the checkpoint of step ``stats_at``
    (``stats-rank<r>.safetensors``). ``stop_at``: a fresh (not resumed) run raises ``Preempted`` when
    step ``stop_at`` starts, after the checkpoints of the steps before it. ``no_dropout``: dropout off
    (its random masks differ between processes; what is compared across them must not)."""

    def __init__(self, out_dir: str, stats_at: int | None = None, stop_at: int | None = None, no_dropout=False):
        self.out_dir = Path(out_dir)
        self.stats_at, self.stop_at, self.no_dropout = stats_at, stop_at, no_dropout
        self.steps: list[dict] = []

    def on_fit_start(self, trainer, pl_module):
        if self.no_dropout:
            for module in pl_module.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0

    def _path(self, trainer, kind: str, ext: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = "-resumed" if trainer.ckpt_path else ""
        return self.out_dir / f"{kind}-rank{trainer.global_rank}{resumed}.{ext}"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.stop_at is not None and trainer.global_step == self.stop_at and not trainer.ckpt_path:
            raise Preempted(f"stopped at step {self.stop_at}")
        tasks = {t: labels.tolist() for t, (_, labels) in batch.items()}
        self.steps.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "tasks": tasks})
        self._path(trainer, "steps", "json").write_text(json.dumps(self.steps))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            from safetensors.torch import save_file

            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            save_file(grads, self._path(trainer, "grads", "safetensors"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # runs before ModelCheckpoint's hook (Lightning calls checkpoint callbacks last)
        if trainer.global_step == self.stats_at:
            from safetensors.torch import save_file

            stats = {f"model.patches.{n}": b.detach().clone() for n, b in pl_module.model.patches.named_buffers()}
            save_file(stats, self._path(trainer, "stats", "safetensors"))
