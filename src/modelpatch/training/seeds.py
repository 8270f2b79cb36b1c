"""Random state that a resumed run restores exactly: every training step draws from generators seeded by
(seed, step, rank), not from whatever a process drew before it (a restarted process draws other numbers while it
builds, validates and creates its loaders)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from modelpatch.data.steps import derived_seed, seed_all


class StepSeeds(Callback):
    """Before each training batch, seed the global generators (dropout, anything drawn in the training step) from
    (``seed``, the number of training batches so far, the global rank); the count is kept in checkpoints.

    The data each step loads is seeded on its own (``data.steps.Step``), in whichever process loads it."""

    def __init__(self, seed: int):
        self.seed = seed
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        seed_all(derived_seed(self.seed, self.batches, trainer.global_rank, 2))
        self.batches += 1

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])
