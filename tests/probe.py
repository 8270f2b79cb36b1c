"""A callback the DDP test adds from the command line: records, per rank, which tasks' patches and
heads received gradient, and a digest of every parameter and buffer at the end of training."""

import hashlib
import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


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
