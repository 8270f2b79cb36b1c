"""Which process of a distributed job this is, from what its launcher set before Lightning starts, so that
the files written before the Trainer exists (Hydra's ``.hydra/``, the log file, ``config.yaml``) have one writer.

Lightning learns the global rank when its Trainer is built; Hydra and ``train.py`` write earlier. Every process
of a job runs the whole Hydra job in the same output folder: SLURM starts one per task (``SLURM_PROCID``),
torchrun sets ``RANK``, and Lightning's own environment (several nodes started by hand, or its child processes
on one node) sets ``NODE_RANK`` and ``LOCAL_RANK``. Lightning's ``rank_zero_only`` reads ``LOCAL_RANK`` alone
before that, so it takes the first process of every node for rank zero.

``conf/hydra/default.yaml`` uses two of these as resolvers (``modelpatch.resolvers``): ``${mp.rank_zero_only:<value>}``
(the value on rank zero, else ``null``: ``hydra.output_subdir``) and ``${mp.rank_suffix:}`` (``""`` on rank zero, else
``.rank<r>``: the other ranks' log files).
"""

from __future__ import annotations

import os
from typing import Any


def launch_rank() -> str:
    """This process's rank as its launcher set it: ``RANK`` (torchrun), ``SLURM_PROCID`` (srun), else
    ``<NODE_RANK>.<LOCAL_RANK>`` (Lightning's environment; the devices per node are not known yet);
    ``"0"`` where none is set (a single process)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return str(int(os.environ[key]))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return "0" if node == local == 0 else f"{node}.{local}"


def is_launch_rank_zero() -> bool:
    """True in the job's first process (global rank zero), or where no launcher set a rank."""
    return launch_rank() == "0"


def rank_zero_value(value: Any) -> Any:
    """``value`` on global rank zero, ``None`` on the other ranks."""
    return value if is_launch_rank_zero() else None


def rank_suffix() -> str:
    """``""`` on global rank zero, ``.rank<r>`` on the others."""
    return "" if is_launch_rank_zero() else f".rank{launch_rank()}"
