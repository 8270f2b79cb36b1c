"""``results.json``: what one run produced, in one JSON object that ``run`` writes (``make_results``) and the
report and the sweeps read (``RESULTS_FILE``). The contract is in docs/architecture.md; fields may be added,
existing ones keep their meaning.

torch is imported where it is used: the report imports this module and stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from modelpatch.training.module import PatchModule

RESULTS_FILE = "results.json"


def make_results(
    cfg: DictConfig, model: PatchModule, metrics: dict[str, float], *, wall_time_s: float, checkpoint: str = "", **run
) -> dict:
    """The ``results.json`` object (see docs/architecture.md for the contract); ``run``: what the run recorded
    besides (``steps``, ``lr_find``)."""
    from hydra.core.hydra_config import HydraConfig

    from modelpatch.files.patch_files import patch_bytes

    counts = model.parameter_counts()
    tasks = {}
    for name, head in model.tasks.items():
        tasks[name] = {
            "test_acc": metrics.get(f"test/{name}/acc"),
            "val_acc": metrics.get(f"val/{name}/acc"),
            "num_classes": head.num_classes,
            "params_patch": counts[f"{name}/patch"],
            "params_head": counts[f"{name}/head"],
            "patch_bytes": patch_bytes(model, name),
            "train_size": head.spec.get("train_size"),
            "train_samples": head.train_samples,
            "frozen": name in model.frozen_tasks,
        }
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    backbone = model.backbone
    return {
        "backbone": {
            "name": backbone.name,
            "width": backbone.width_mult,
            "features": backbone.num_features,
            "weights": backbone.weights_source,
        },
        "patch": model.patch.kind,
        "norm_stats": model.patch.norm_stats,
        "train_shared": model.model.train_shared,
        "tasks": tasks,
        "params": {
            **{k: counts[k] for k in ("total", "trainable", "shared", "backbone", "separate_models")},
            "ratio_vs_separate": round(counts["total"] / counts["separate_models"], 4),
        },
        "init_from": model.hparams.get("init_from"),
        "mixing": model.mixing.name,
        "test_acc": metrics.get("test/acc"),
        "val_acc": metrics.get("val/acc"),
        "seed": cfg.seed,
        "epochs": cfg.trainer.get("max_epochs"),
        "steps": run.get("steps"),
        "lr": base_rates(model),
        "lr_find": run.get("lr_find"),
        "wall_time_s": round(wall_time_s, 2),
        "overrides": overrides,
        "checkpoint": checkpoint,
        "output_dir": str(cfg.paths.output_dir),
    }


def base_rates(model: PatchModule) -> dict[str, float | str]:
    """The patch's and the head's base learning rates (``optim.patch_lr``/``head_lr``, else ``optim.lr``)."""
    o = model.optim
    return {"patch": o.lr if o.patch_lr is None else o.patch_lr, "head": o.lr if o.head_lr is None else o.head_lr}
