"""Resuming a run: the checkpoint ``Trainer.fit`` continues from (the newest readable one in the run's checkpoint
folder), the options it must share with the run that wrote it, and writing checkpoints so that a crash
never leaves half of one in place."""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import to_absolute_path
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from modelpatch.atomic import atomic_write, stale_temporaries
from modelpatch.config import ConfigError

log = logging.getLogger("modelpatch")

# The options a resumed run must share with the run that wrote its checkpoint (others, such as
# trainer.max_epochs, devices or loggers, may change on resume).
RESUME_KEYS = (
    "backbone",
    "patch",
    "task",
    "optim",
    "data.batch_size",
    "seed",
    "channels_last",
    "init_from",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
)
UNREADABLE = ".unreadable"
LAST = "last.ckpt"
NOT_ABOUT_THE_FILE = {errno.EIO, errno.ENOMEM, errno.EACCES, errno.EPERM, errno.ENFILE, errno.EMFILE}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing into a temporary file beside the checkpoint, flushed to disk, then
    renamed into place (``modelpatch.atomic``): a process killed while writing leaves the previous checkpoint.
    (Lightning's own writes the file in place, or moves a temporary file across file systems: a copy.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), fsync=True)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, except that with ``every_n_train_steps`` a step that ends an epoch is saved
    at the epoch's end (after its validation, where the per-epoch checkpoints are written) rather than before
    its validation: Lightning resumes a checkpoint written at an epoch's last batch as if the epoch had ended,
    skipping its validation (and the resumed run would differ)."""

    _deferred_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._every_n_train_steps >= 1 and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            due = trainer.global_step % self._every_n_train_steps == 0
            self._deferred_step = trainer.global_step if due else None
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._deferred_step != trainer.global_step:
            return
        self._deferred_step = None
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


@dataclass
class ResumeChoice:
    """The checkpoint a run resumes from (``None``: it starts fresh), and the newer ones it could not read, each
    with the reason."""

    path: Path | None
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    config: Mapping | None = None  # the run config saved in ``path``, when it was read to choose it


def checkpoint_dir(cfg: DictConfig) -> Path:
    """The folder the run's ModelCheckpoint writes to (``<output_dir>/checkpoints`` by default)."""
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    return Path(checkpoint.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints")


def resume_candidates(folder: Path) -> list[Path]:
    """The checkpoints a run may resume from, in the order they are tried: ``last.ckpt``, the other ones
    (step or epoch checkpoints) newest first, ``best.ckpt``."""
    mtimes = {}
    for p in folder.glob("*.ckpt") if folder.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # set aside meanwhile by another process of the run
            mtimes[p] = p.stat().st_mtime
    last = [p for p in mtimes if p.name == LAST]
    best = [p for p in mtimes if p.name == "best.ckpt"]
    others = sorted((p for p in mtimes if p.name not in (LAST, "best.ckpt")), key=lambda p: -mtimes[p])
    return last + others + best


def read_resumable(path: Path) -> dict:
    """The checkpoint at ``path`` (tensors memory-mapped), if a run can resume from it.

    Raises:
        ValueError: why it cannot (unreadable, not a training state, not modelpatch's).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # read as a whole for the reason (mapping a file cut short fails without one)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except (MemoryError, FileNotFoundError):
            raise
        except OSError as err:
            if err.errno in NOT_ABOUT_THE_FILE:  # the machine, not the file: do not set a good checkpoint aside
                raise
            raise ValueError(f"unreadable (cut short, or not a torch file): {_reason(err)}") from err
        except Exception as err:
            raise ValueError(f"unreadable (cut short, or not a torch file): {_reason(err)}") from err
    if not isinstance(ckpt, Mapping) or "loops" not in ckpt or "optimizer_states" not in ckpt:
        raise ValueError("no training state (loops, optimizer) in it: a weights-only checkpoint")
    if not isinstance(ckpt.get("hyper_parameters", {}).get("meta", {}).get("config"), Mapping):
        raise ValueError("not a modelpatch checkpoint (no run config in its hyper-parameters)")
    return ckpt


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0].split('. ')[0][:160]}"


def choose_resume(cfg: DictConfig) -> ResumeChoice:
    """``ckpt_path`` as given; else, with ``resume: true``, the first readable of ``resume_candidates``."""
    if cfg.get("ckpt_path"):
        return ResumeChoice(Path(to_absolute_path(str(cfg.ckpt_path))))
    if not cfg.get("resume", True):
        return ResumeChoice(None)
    unreadable = []
    for path in resume_candidates(checkpoint_dir(cfg)):
        try:
            ckpt = read_resumable(path)
        except ValueError as err:
            unreadable.append((path, str(err)))
            continue
        return ResumeChoice(path, unreadable, ckpt["hyper_parameters"]["meta"]["config"])
    return ResumeChoice(None, unreadable)


def resume_path(cfg: DictConfig, *, set_aside: bool = True) -> str | None:
    """What ``Trainer.fit`` resumes from (``choose_resume``), saying why where a newer checkpoint was passed
    over. ``set_aside``: rename each such file to ``<name>.unreadable`` (kept, never deleted), remove the
    temporary files of killed checkpoint writes, and make ``last.ckpt`` a copy of the checkpoint chosen when it
    is another one (``restore_last``); one process of a run does it (global rank zero)."""
    choice = choose_resume(cfg)
    if set_aside:
        for tmp in stale_temporaries(checkpoint_dir(cfg)):
            tmp.unlink(missing_ok=True)
            log.info(f"removed {tmp.name}: a checkpoint a killed process left half-written (never in place)")
    for path, why in choice.unreadable:
        kept = set_aside_unreadable(path) if set_aside else path
        log.warning(f"cannot resume from {path}: {why}; kept as {kept}")
    if choice.unreadable and choice.path is not None:
        log.warning(f"resuming from {choice.path} instead, the newest readable checkpoint")
    if choice.path is None:
        return None
    return str(restore_last(cfg, choice.path) if set_aside else choice.path)


def restore_last(cfg: DictConfig, path: Path) -> Path:
    """Make ``last.ckpt`` a copy of ``path``, the checkpoint a run resumes from (chosen, not ``ckpt_path``),
    when it is another one and the run writes ``last.ckpt``: a run resumed at its end trains no step, so would
    write none. Returns what to resume from: the copy (the path the run's other processes choose after it), or
    ``path`` where nothing was copied."""
    last = checkpoint_dir(cfg) / LAST
    if path == last or cfg.get("ckpt_path") or not _writes_last(cfg):
        return path
    try:
        atomic_write(last, lambda tmp: shutil.copyfile(path, tmp), fsync=True)
    except OSError as err:  # the resume itself does not need the copy
        log.warning(f"could not copy {path.name} to {last} ({_reason(err)}); resuming from {path.name}")
        return path
    log.info(f"{last} is now a copy of {path.name}, until the run writes its next checkpoint")
    return last


def _writes_last(cfg: DictConfig) -> bool:
    """Whether the run writes ``last.ckpt`` into its checkpoint folder (``callbacks.last_checkpoint``, on by
    default)."""
    last = (cfg.get("callbacks") or {}).get("last_checkpoint") or {}
    folder = Path(last.get("dirpath") or checkpoint_dir(cfg))
    return last.get("filename") == LAST.removesuffix(".ckpt") and folder == checkpoint_dir(cfg)


def set_aside_unreadable(path: Path) -> Path:
    target = path.with_name(path.name + UNREADABLE)
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}{UNREADABLE}.{n}"), n + 1
    with contextlib.suppress(FileNotFoundError):  # another process of the run set it aside first
        path.rename(target)
    return target


def check_resume(cfg: DictConfig) -> None:
    """Refuse, before any data is read, a resume that cannot work: ``ckpt_path`` unreadable, no readable
    checkpoint where some exist, or a checkpoint written under other options (``RESUME_KEYS``), naming each."""
    choice = choose_resume(cfg)
    if choice.path is None:
        if choice.unreadable:
            listed = "; ".join(f"{p.name}: {why}" for p, why in choice.unreadable)
            raise ConfigError(
                f"cannot resume: no readable checkpoint in {checkpoint_dir(cfg)} ({listed}). They are kept; "
                "run with resume=false to start fresh"
            )
        return
    saved = choice.config
    if saved is None:  # ckpt_path, as given
        try:
            saved = read_resumable(choice.path)["hyper_parameters"]["meta"]["config"]
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"cannot resume from ckpt_path={choice.path}: {err}") from err
    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = []
    for key in RESUME_KEYS:
        before, after = _lookup(saved, key), _lookup(now, key)
        if before != after:
            diffs.extend(_differences(key, before, after))
    if diffs:
        where = choice.path.parent
        how = "drop ckpt_path" if cfg.get("ckpt_path") else f"resume=false to start fresh (overwrites {where})"
        raise ConfigError(
            f"cannot resume from {choice.path}: it was written with other options: {'; '.join(diffs)}. "
            f"Run with the checkpoint's options to resume, or {how}"
        )


def _lookup(tree: object, key: str) -> object:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


def _differences(key: str, before: object, after: object) -> list[str]:
    """``key: <checkpoint> in the checkpoint, <now> now`` for each differing leaf."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        out = []
        for k in sorted(set(before) | set(after), key=str):
            if before.get(k) != after.get(k):
                out.extend(_differences(f"{key}.{k}", before.get(k), after.get(k)))
        return out
    return [f"{key}={before!r} in the checkpoint, {after!r} now"]
