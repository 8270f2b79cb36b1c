"""A callback the multi-node tests add from the command line: per global rank, the tasks that rank itself
computed a training loss for (before DDP averages the gradients), the checkpoint it resumed from, and
``DDPProbe``'s digests of the weights at the end of training, written to ``<out_dir>/rank<r>.json``."""

import json

from .probe import DDPProbe


class NodeProbe(DDPProbe):
    def __init__(self, out_dir: str):
        super().__init__(out_dir)
        self.trained: set[str] = set()
        self.ckpt_path: str | None = None
        self.start_step = -1

    def on_fit_start(self, trainer, pl_module):
        self.ckpt_path = trainer.ckpt_path

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the metric's state between compute() calls is this rank's own (torchmetrics syncs only in compute)
        seen = pl_module.train_stats.total
        self.trained |= {t for i, t in enumerate(pl_module.task_names) if seen[i] > 0}

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        report = json.loads(path.read_text())
        report.update(
            trained=sorted(self.trained),
            node_rank=trainer.node_rank,
            local_rank=trainer.local_rank,
            ckpt_path=self.ckpt_path,
            start_step=self.start_step,
            end_step=trainer.global_step,
        )
        path.write_text(json.dumps(report))
