"""What a run's SLURM job asks for: the trainer's nodes and devices, GPUs only where the partition has them, CPUs
for its data loaders, and enough requeues for the run's expected hours.

The resolvers ``conf/hydra/launcher/slurm.yaml`` uses (registered by ``modelpatch.resolvers``):

- ``${mp.devices:${trainer.devices}}``: ``--ntasks-per-node``, one task per device.
- ``${mp.slurm_nodes:${trainer.num_nodes},<strategy>}``: ``--nodes``; more than one needs a strategy Lightning
  runs across nodes (DDP, FSDP, DeepSpeed or ``auto``, which picks DDP), else an error before submitting.
- ``${mp.slurm_gpus:${trainer.accelerator},${trainer.devices},${hydra.launcher.partition}}``: ``--gpus-per-node``.
  ``cpu``: none. ``auto``: one per device where the partition's nodes have GPUs (sinfo's GRES), none where
  they have none (the job then trains on CPUs). ``gpu``/``cuda`` on a partition without GPUs: an error,
  before anything is submitted, that names the overrides that fix it.
- ``${mp.cpus_per_task:${data.num_workers}}``: one CPU for the training process and one per DataLoader worker.
- ``${mp.requeues:${wall_hours},${.timeout_min}}``: time-outs submitit requeues, so that
  ``timeout_min x (requeues + 1)`` covers ``wall_hours`` with one attempt to spare (at least 3).

``modelpatch.cluster.callbacks.CheckSlurmShape`` checks a SLURM multirun's shape against these before submitting.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from typing import Any

from omegaconf import DictConfig, ListConfig

log = logging.getLogger("modelpatch")

DEFAULT_REQUEUES = 3


class SlurmResourceError(ValueError):
    """The run asks SLURM for something the cluster does not offer."""


def device_count(devices: Any) -> int:
    """``trainer.devices`` as a number of processes per node: an int, a list of ids, or ``"0,1"``."""
    if isinstance(devices, list | tuple | ListConfig):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(
        f"trainer.devices={devices!r} cannot be turned into SLURM tasks per node: set it to a number of devices "
        f"(trainer.devices=2) or a list of ids (trainer.devices=[0,1]) when launching on SLURM"
    )


def gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """GPUs to request per node: none for ``trainer.accelerator=cpu``, else one per device."""
    if str(accelerator) == "cpu":
        return None
    return device_count(devices)


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


MULTI_NODE_STRATEGIES = ("ddp", "fsdp", "deepspeed")  # and "auto" (Lightning picks DDP for several nodes)
SINGLE_PROCESS_LAUNCH = ("spawn", "fork", "notebook")  # start their own processes: SLURM starts one per task


def strategy_name(strategy: Any) -> str:
    """``trainer.strategy`` as a name: a string (``ddp``), a config's ``_target_`` (``...DDPStrategy``), or
    ``auto`` when unset."""
    if strategy in (None, "None", "null"):
        return "auto"
    if isinstance(strategy, DictConfig | dict):
        return str(strategy.get("_target_", "?")).rsplit(".", 1)[-1]
    return str(strategy)


def slurm_nodes(num_nodes: Any, strategy: Any = "auto") -> int:
    """``--nodes``: ``trainer.num_nodes``, checked.

    Raises:
        SlurmResourceError: not a positive number, or several nodes with a strategy that cannot span them.
    """
    text = str(num_nodes).strip()
    if not text.isdigit() or int(text) < 1:
        raise SlurmResourceError(f"trainer.num_nodes={num_nodes!r}: set it to a number of nodes (1, 2, ...)")
    nodes, name = int(text), strategy_name(strategy)
    lowered = name.lower()
    spans = lowered == "auto" or any(k in lowered for k in MULTI_NODE_STRATEGIES)
    if nodes > 1 and (not spans or any(k in lowered for k in SINGLE_PROCESS_LAUNCH)):
        raise SlurmResourceError(
            f"trainer.num_nodes={nodes} with trainer.strategy={name}: several nodes need DDP, where SLURM starts "
            f"one process per device on every node; use trainer=ddp (or trainer.strategy=ddp); nothing was submitted"
        )
    return nodes


def cpus_per_task(num_workers: Any) -> int:
    """One CPU for the training process and one per DataLoader worker (``data.num_workers``)."""
    return 1 + max(0, int(num_workers or 0))


def requeues(wall_hours: Any, timeout_min: Any) -> int:
    """Time-outs to requeue so that ``timeout_min x (requeues + 1)`` covers ``wall_hours`` plus one attempt
    (the work since the last checkpoint is redone); at least ``DEFAULT_REQUEUES``."""
    if wall_hours in (None, "None", "null"):
        return DEFAULT_REQUEUES
    return max(DEFAULT_REQUEUES, math.ceil(60 * float(wall_hours) / float(timeout_min)))
