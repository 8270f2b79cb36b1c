"""Read back an offline W&B run: its ``run-<id>.wandb`` transaction log, decoded record by record.

wandb 0.31 writes neither ``files/wandb-summary.json`` nor ``files/config.yaml`` for offline runs and no
longer ships a reader (``wandb.sdk.internal.datastore``), so this reads the log format it documents for
its own tools: a 7-byte header (``:W&B``, magic 0xBEE1, version), then LevelDB-style 32 KiB blocks of
records (checksum, length, type: full/first/middle/last), each a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log (header {ident!r}, magic {magic:#x})")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:  # zero padding at the end of the file
            break


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    project: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, pb.MetricRecord] = field(default_factory=dict)
    exited: bool = False


def read_offline_run(run_dir: Path) -> OfflineRun:
    """The run in ``<save_dir>/wandb/offline-run-*`` (config, merged summary, history rows, metric definitions)."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun()
    for raw in raw_records(log):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.project, run.group, run.name, run.job_type = r.project, r.run_group, r.display_name, r.job_type
            run.tags = list(r.tags)
            run.config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "exit":
            run.exited = True
    return run
