"""What a run's SLURM job asks for: GPUs only where the partition has them, CPUs for its data loaders, and
enough requeues for the run's expected hours.

Resolvers for ``conf/hydra/launcher/slurm.yaml``, registered when this module is imported (``launch`` does):

- ``${mp.slurm_gpus:${trainer.accelerator},${trainer.devices},${hydra.launcher.partition}}``: ``--gpus-per-node``.
  ``cpu``: none. ``auto``: one per device where the partition's nodes have GPUs (sinfo's GRES), none where
  they have none (the job then trains on CPUs). ``gpu``/``cuda`` on a partition without GPUs: an error,
  before anything is submitted, that names the overrides that fix it.
- ``${mp.cpus_per_task:${data.num_workers}}``: one CPU for the training process and one per DataLoader worker.
- ``${mp.requeues:${wall_hours},${.timeout_min}}``: time-outs submitit requeues, so that
  ``timeout_min x (requeues + 1)`` covers ``wall_hours`` with one attempt to spare (at least 3).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger("modelpatch")

DEFAULT_REQUEUES = 3


class SlurmResourceError(ValueError):
    """The run asks SLURM for something the cluster does not offer."""


def gres_gpus(gres: str) -> int:
    """GPUs per node in one sinfo GRES field: ``gpu:4``, ``gpu:a100:8(S:0-1)``, ``gpu:a100:2,gpu:v100:2``,
    ``(null)``."""
    total = 0
    for item in gres.split(","):
        found = re.fullmatch(r"gpu(?::[^:(]+)?:(\d+)(?:\(.*\))?", item.strip())
        if found:
            total += int(found.group(1))
    return total


def partition_gpus(partition: str | None) -> int | None:
    """The most GPUs one node of ``partition`` (``None``: the cluster's default) has, from ``sinfo``;
    ``None`` where sinfo is not installed (no cluster to ask).

    Raises:
        SlurmResourceError: the partition does not exist (listing those that do) or sinfo fails.
    """
    if shutil.which("sinfo") is None:
        return None
    proc = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise SlurmResourceError(f"sinfo failed: {proc.stderr.strip() or proc.stdout.strip()}")
    rows = [line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line]
    names = sorted({p.rstrip("*") for p, _ in rows})
    default = next((p.rstrip("*") for p, _ in rows if p.endswith("*")), None)
    wanted = partition or default
    gres = [g for p, g in rows if p.rstrip("*") == wanted]
    if not gres:
        raise SlurmResourceError(
            f"hydra.launcher.partition={partition!r}: no such SLURM partition"
            + ("" if partition else " (and no default one)")
            + f"; partitions: {', '.join(names) or 'none'}"
        )
    return max(gres_gpus(g) for g in gres)


def slurm_gpus(accelerator: Any, devices: Any, partition: Any) -> int | None:
    """``--gpus-per-node`` for a run: see the module's docstring."""
    from modelpatch.launch import device_count

    accelerator = str(accelerator)
    if accelerator == "cpu":
        return None
    wanted = device_count(devices)
    offered = partition_gpus(None if partition in (None, "None", "null") else str(partition))
    if offered is None or offered >= wanted:
        return wanted
    where = f"partition {partition!r}" if partition not in (None, "None", "null") else "the default partition"
    if accelerator == "auto" and offered == 0:
        log.info(f"SLURM: {where} has no GPUs (sinfo GRES): trainer.accelerator=auto requests none, trains on CPUs")
        return None
    raise SlurmResourceError(
        f"trainer.accelerator={accelerator} with trainer.devices={devices} needs {wanted} GPU(s) per node, but the "
        f"nodes of {where} have {offered} (sinfo GRES); nothing was submitted. Run on CPUs with "
        f"trainer.accelerator=cpu or pick a partition with GPUs (hydra.launcher.partition=<name>; sinfo -o '%P %G' "
        f"lists them)" + (f", or ask for fewer (trainer.devices={offered})" if offered else "")
    )


def cpus_per_task(num_workers: Any) -> int:
    """One CPU for the training process and one per DataLoader worker (``data.num_workers``)."""
    return 1 + max(0, int(num_workers or 0))


def requeues(wall_hours: Any, timeout_min: Any) -> int:
    """Time-outs to requeue so that ``timeout_min x (requeues + 1)`` covers ``wall_hours`` plus one attempt
    (the work since the last checkpoint is redone); at least ``DEFAULT_REQUEUES``."""
    if wall_hours in (None, "None", "null"):
        return DEFAULT_REQUEUES
    return max(DEFAULT_REQUEUES, math.ceil(60 * float(wall_hours) / float(timeout_min)))


def _register_resolvers() -> None:
    for name, fn in {"mp.slurm_gpus": slurm_gpus, "mp.cpus_per_task": cpus_per_task, "mp.requeues": requeues}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register_resolvers()
