"""One training run from a composed config: build, fit, test, write ``results.json``."""

from __future__ import annotations

import functools
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from modelpatch.atomic import atomic_write, write_json
from modelpatch.cluster.jobs import cluster_trainer_kwargs, threads_per_job
from modelpatch.cluster.ranks import is_launch_rank_zero
from modelpatch.config import ConfigError
from modelpatch.data import TaskDataModule, TaskSpec, make_mixing, task_specs
from modelpatch.data.steps import describe_steps, steps_per_epoch
from modelpatch.files.patch_files import export_patches, read_patch_file
from modelpatch.files.patched_model import load_patched_model
from modelpatch.files.results import RESULTS_FILE, make_results
from modelpatch.models.backbones import PRETRAINED, check_backbone_name
from modelpatch.models.memory import check_mode as check_lean_mode
from modelpatch.models.patches import parse_kind, resolve_patch
from modelpatch.training import transfer
from modelpatch.training.budget import apply_min_steps
from modelpatch.training.checkpoints import read_init_checkpoint
from modelpatch.training.compiling import compile_backbone, compile_backend
from modelpatch.training.console import quiet_lightning
from modelpatch.training.distributed import check_distributed, ddp_strategy
from modelpatch.training.features import cache_features
from modelpatch.training.loggers import setup_wandb, summarize_tested
from modelpatch.training.lr_find import AUTO, choose_lr
from modelpatch.training.module import PatchModule, TaskInfo
from modelpatch.training.optim import OptimConfig, check_optim
from modelpatch.training.resume import AtomicCheckpointIO, check_resume, resume_path
from modelpatch.training.resume_state import ResumeState
from modelpatch.training.seeds import StepSeeds
from modelpatch.training.weights import load_backbone

log = logging.getLogger("modelpatch")
quiet_lightning()


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Log a failure to the run's log and re-raise; always print the output dir and close W&B."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        try:
            return task(cfg)
        except Exception:
            log.exception("run failed")
            raise
        finally:
            log.info(f"output dir: {cfg.paths.output_dir}")
            _close_wandb()

    return wrapped


def _close_wandb() -> None:
    wandb = sys.modules.get("wandb")  # a run that never imported wandb has nothing to close
    if wandb is not None and wandb.run is not None:
        log.info("closing wandb")
        try:
            wandb.finish()
        except Exception as err:  # its service was killed with the job (SLURM requeue, scancel): keep the real exit
            log.warning(f"W&B run not closed ({type(err).__name__}: {err}); what it logged is in its run folder")


def extras(cfg: DictConfig) -> None:
    """Apply the ``extras`` switches: silence warnings, print the config; always save it."""
    if cfg.get("extras", {}).get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    _save_and_print_config(cfg)


@rank_zero_only
def _save_and_print_config(cfg: DictConfig) -> None:
    if not is_launch_rank_zero():  # another node's first process (rank_zero_only only reads LOCAL_RANK yet)
        return
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(output_dir / "config.yaml", lambda tmp: tmp.write_text(text))
    if cfg.get("extras", {}).get("print_config"):
        from rich.console import Console
        from rich.syntax import Syntax

        Console().print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))


def check_seed(seed: Any) -> int:
    """``seed`` as the whole number Lightning seeds every generator with.

    Raises:
        ConfigError: naming the option and what it takes (``seed=abc``, ``seed=1.5``, ``seed=true``).
    """
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32:
        return seed
    raise ConfigError(f"seed={seed!r}: set a whole number from 0 to 2**32-1 (seed=0; several runs: -m seed=0,1,2)")


def check_config(cfg: DictConfig) -> None:
    """Cheap checks of names and values, before any data or weights are read."""
    check_seed(cfg.seed)
    check_backbone_name(cfg.backbone.name)
    parse_kind(cfg.patch.kind)
    compile_backend(cfg.get("compile"))
    try:
        check_optim(OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True)))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        make_mixing(cfg.task.get("mixing", "all"), seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(f"task.mixing: {err}") from err
    try:
        check_lean_mode(cfg.get("lean_backward", "auto"))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    cache = cfg.data.get("cache_features", "auto")
    if cache not in ("auto", True, False):
        raise ConfigError(f"data.cache_features={cache!r}; choose auto, true or false")
    check_resume(cfg)


def build(cfg: DictConfig) -> tuple[TaskDataModule, PatchModule]:
    """Config -> (data, model). Every check happens here, before training starts."""
    check_config(cfg)
    check_distributed(cfg)
    specs = task_specs(OmegaConf.to_container(cfg.task, resolve=True), OmegaConf.to_container(cfg.data, resolve=True))
    init = read_init_checkpoint(cfg)
    source, kept = transfer.plan(cfg, init, specs)
    bb = cfg.backbone
    weights = bb.weights
    if weights is not None and weights not in PRETRAINED:
        weights = hydra.utils.to_absolute_path(str(weights))
    backbone = load_backbone(bb.name, weights=weights, width=bb.width, mean=bb.mean, std=bb.std)
    patch = resolve_patch(backbone, cfg.patch.kind, norm_stats=cfg.patch.norm_stats, model_name=bb.name)
    mixing = make_mixing(cfg.task.get("mixing", "all"), seed=cfg.seed)
    datamodule = load_data(cfg, specs + kept, train_tasks=[s.name for s in specs], mixing=mixing)
    model = PatchModule(
        backbone,
        patch,
        [_task_info(s, datamodule) for s in specs + kept],
        optim=OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True)),
        mean=bb.mean,
        std=bb.std,
        train_shared=cfg.patch.train_shared,
        mixing=mixing,
        channels_last=cfg.get("channels_last", False),
        lean_backward=cfg.get("lean_backward", "auto"),
        meta={"config": OmegaConf.to_container(cfg, resolve=True)},
    )
    if init is not None:
        transfer.load(model, init, source, kept)
    _cache_features(cfg, datamodule, model)
    compile_backbone(model, compile_backend(cfg.get("compile")))
    return datamodule, model


def load_data(cfg: DictConfig, specs: list[TaskSpec], **kwargs) -> TaskDataModule:
    """The tasks' data, loaded, with the ``data.*`` options of ``cfg`` (``kwargs``: more ``TaskDataModule`` ones)."""
    datamodule = TaskDataModule(
        specs,
        root=cfg.data.root,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        **kwargs,
    )
    datamodule.setup()
    return datamodule


def _task_info(spec: TaskSpec, datamodule: TaskDataModule) -> TaskInfo:
    data = datamodule.data[spec.name]
    return TaskInfo(
        spec.name,
        data.num_classes,
        data.class_names,
        spec.loss_weight,
        train_samples=len(data.train.labels),
        spec=asdict(spec),
    )


def _cache_features(cfg: DictConfig, datamodule: TaskDataModule, model: PatchModule) -> None:
    """``data.cache_features``: with a fixed backbone, the heads train on features computed once."""
    cache = cfg.data.get("cache_features", "auto")
    if cache is True or (cache == "auto" and model.model.fixed_backbone and datamodule.cacheable):
        on_gpu = torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("auto", "gpu", "cuda")
        start = time.time()
        cache_features(datamodule, model.to("cuda" if on_gpu else "cpu"))
        model.cpu()
        log.info(f"backbone features cached for every split ({time.time() - start:.1f}s): heads train on them")


def describe_params(model: PatchModule) -> str:
    """The one-line parameter summary printed for every run."""
    c = model.parameter_counts()
    per_task = "; ".join(f"{t}: patch {c[f'{t}/patch']:,} + head {c[f'{t}/head']:,}" for t in model.task_names)
    pct = 100.0 * sum(c[f"{t}/patch"] for t in model.task_names) / max(1, c["backbone"])
    return (
        f"params: total {c['total']:,} | trainable {c['trainable']:,} | shared {c['shared']:,} | "
        f"backbone {c['backbone']:,} | patch {model.patch.kind} = {pct:.2f}% of backbone | {per_task}"
    )


def instantiate_dict(node: DictConfig | None) -> list:
    built = [hydra.utils.instantiate(v) for v in (node or {}).values() if v is not None and "_target_" in v]
    return [b for b in built if b is not None]  # a factory may build nothing (callbacks.progress, bar off)


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Build from ``cfg``, fit, test on the best checkpoint, write ``results.json``.

    Returns:
        The logged metrics (floats) and the built objects.
    """
    start = time.time()
    quiet_lightning()  # again: a caller's warnings.catch_warnings may have reset the filters since import
    threads = threads_per_job(cfg.get("threads"))
    if threads:
        torch.set_num_threads(threads)
    L.seed_everything(check_seed(cfg.seed), workers=True)
    datamodule, model = build(cfg)
    log.info(describe_params(model))
    trainer, loggers = make_trainer(cfg, datamodule, model, started=start)
    found = None
    if cfg.get("train", True):
        ckpt_path = resume_path(cfg, set_aside=is_launch_rank_zero())
        if model.optim.lr == AUTO:
            found = choose_lr(cfg, model, datamodule, trainer, ckpt_path)
        with warnings.catch_warnings():
            # frozen normalization layers (norm_stats=frozen, a fixed backbone) are in eval mode on purpose
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            # the datamodule resumes its sampler mid-epoch (TaskDataModule.state_dict), not the dataloader
            warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = _floats(trainer.callback_metrics)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("train", True) and best:
        # val/* of the model that is tested and exported (the best checkpoint), not of the last epoch
        trainer.validate(model, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
        metrics.update(_floats(trainer.callback_metrics))
        log.info(f"validation of the tested checkpoint {best}: val/acc {metrics.get('val/acc', float('nan')):.4f}")
    if cfg.get("test", True):
        if cfg.get("train", True) and not best:
            log.warning("no best checkpoint; testing the weights as they are after training")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update(_floats(trainer.callback_metrics))
    summarize_tested(loggers, metrics)
    if trainer.is_global_zero:
        write_outputs(
            cfg,
            model,
            metrics,
            wall_time_s=next(c for c in trainer.callbacks if isinstance(c, ResumeState)).elapsed_s(),
            checkpoint=best,
            steps=trainer.global_step,
            lr_find=found,
        )
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


def make_trainer(
    cfg: DictConfig, datamodule: TaskDataModule, model: PatchModule, *, started: float | None = None
) -> tuple[L.Trainer, list]:
    """The Trainer of ``cfg.trainer`` with the run's callbacks, loggers and DDP strategy; and the loggers.
    ``started``: when the run's process started (``time.time()``; default now), for its wall time."""
    # seeds and state that make a resumed run the same run (docs/clusters.md: preemption and faults)
    callbacks = [*instantiate_dict(cfg.get("callbacks")), StepSeeds(cfg.seed), ResumeState(started)]
    loggers = instantiate_dict(cfg.get("logger"))
    log.info(
        f"trainer: {cfg.trainer._target_}; callbacks: {[type(c).__name__ for c in callbacks]}; "
        f"loggers: {[type(lg).__name__ for lg in loggers]}; torch threads: {torch.get_num_threads()}"
    )
    strategy = ddp_strategy(cfg.trainer, model.mixing, model.trainable_tasks)
    cluster = cluster_trainer_kwargs()
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO(), *cluster.pop("plugins", [])],
        **checkpointing_kwargs(cfg.trainer, callbacks),
        **cluster,
        **({"strategy": strategy} if strategy is not None else {}),
    )
    sizes = {t: len(datamodule.data[t].train.labels) for t in datamodule.train_tasks}
    lengthened = apply_min_steps(
        trainer, steps_per_epoch(sizes, model.mixing, datamodule.batch_size, trainer.world_size)
    )
    if trainer.is_global_zero:
        log.info(describe_steps(sizes, model.mixing, datamodule.batch_size, trainer.world_size))
        if lengthened:
            log.info(lengthened)
    setup_wandb(loggers, model.task_names)
    if loggers:
        trainer.logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})
    return trainer, loggers


def write_outputs(cfg: DictConfig, model: PatchModule, metrics: dict[str, float], **results_kwargs) -> None:
    """The patch files (``export_patches``) and ``results.json`` of a run, in its output dir."""
    files = {}
    if cfg.get("export_patches", True):
        files = export_patches(model, Path(cfg.paths.output_dir) / "patches", metrics)
        log.info(f"patch files: {', '.join(str(p) for p in files.values())}")
    results = make_results(cfg, model, metrics, **results_kwargs)
    results["patch_files"] = {k: str(v) for k, v in files.items()}
    write_json(Path(cfg.paths.output_dir) / RESULTS_FILE, results)


def checkpointing_kwargs(trainer_cfg: DictConfig, callbacks: list) -> dict[str, bool]:
    """Without a ModelCheckpoint in ``callbacks`` (``callbacks=none``), Lightning would add its own and
    write checkpoints anyway: turn checkpointing off, unless the trainer config sets it itself."""
    if "enable_checkpointing" in trainer_cfg:
        return {}
    return {"enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks)}


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def get_metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimizes; an unknown name is an error that lists the logged ones."""
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric {name!r} was not logged; logged metrics: {', '.join(sorted(metrics))} "
            "(a run that does not validate, e.g. trainer.limit_val_batches=0, needs optimized_metric=null)"
        )
    value = metrics[name]
    log.info(f"{name} = {value:.4f}")
    return value


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Base weights + patch files -> test metrics on each file's task, with its training data recipe.

    Writes ``eval_results.json``: per task, the accuracy measured now and the one the patch file
    recorded when it was trained.
    """
    if not cfg.get("patches"):
        raise ConfigError("eval needs patch files: patches=[<run>/patches/<task>.safetensors,...]")
    files = [hydra.utils.to_absolute_path(str(p)) for p in cfg.patches]
    base = cfg.get("base")
    if base is not None and base not in PRETRAINED:
        base = hydra.utils.to_absolute_path(str(base))
    model = load_patched_model(files, base=base, channels_last=cfg.get("channels_last"))
    data_options = OmegaConf.to_container(cfg.data, resolve=True)
    catalog = {t: h.spec for t, h in model.tasks.items()}
    specs = task_specs({"tasks": model.task_names, "catalog": catalog}, data_options)
    datamodule = load_data(cfg, specs, train_tasks=[])
    log.info(describe_params(model))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    trainer.test(model, datamodule=datamodule)
    metrics = _floats(trainer.callback_metrics)
    recorded = {pf: read_patch_file(pf).meta for pf in files}
    results = {
        "tasks": {
            meta["task"]: {
                "test_acc": metrics.get(f"test/{meta['task']}/acc"),
                "trained_test_acc": meta["test_acc"],
                "patch_file": pf,
            }
            for pf, meta in recorded.items()
        },
        "backbone": model.backbone.name,
        "patch": model.patch.kind,
        "base": model.backbone.weights_source,
    }
    write_json(Path(cfg.paths.output_dir) / "eval_results.json", results)
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}
