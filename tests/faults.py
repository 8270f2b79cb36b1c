"""What the fault tests compare: a run folder's final state as digests (``run_state``), and ``train.py`` killed
at chosen points (``tests/kill.py``) and restarted in the same folder until it finishes (``run_killed``)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from modelpatch.models.state_dicts import hash_tensors

from .support import ROOT, popen, train_py


def tensors_digest(tensors: dict) -> str:
    return hash_tensors(tensors).hexdigest()[:16]


def optimizer_digest(states: list[dict]) -> str:
    flat = {}
    for i, opt in enumerate(states):
        for p, s in opt["state"].items():
            flat.update({f"{i}.{p}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return tensors_digest(flat)


def checkpoint_state(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {
        "global_step": ckpt["global_step"],
        "epoch": ckpt["epoch"],
        "weights": tensors_digest(ckpt["state_dict"]),
        "optimizer": optimizer_digest(ckpt["optimizer_states"]),
        "schedulers": ckpt["lr_schedulers"],
    }


def metric_rows(path: Path) -> list[dict]:
    """metrics.csv as rows without empty cells, in step order (rows logged at one step keep their order)."""
    with open(path, newline="") as f:
        rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return sorted(rows, key=lambda r: int(r["step"]))


def run_state(out: Path) -> dict:
    """Everything a finished run leaves that must not depend on how often it was killed."""
    results = json.loads((out / "results.json").read_text())
    return {
        "last": checkpoint_state(out / "checkpoints" / "last.ckpt"),
        "best": checkpoint_state(out / "checkpoints" / "best.ckpt"),
        "patches": {p.name: tensors_digest(load_file(p)) for p in sorted((out / "patches").glob("*.safetensors"))},
        "accuracies": {t: (r["val_acc"], r["test_acc"]) for t, r in results["tasks"].items()},
        "metrics": metric_rows(out / "csv" / "metrics.csv"),
    }


def start_reference(out: Path, args: list[str], **kwargs) -> subprocess.Popen:
    """``train.py <args>`` uninterrupted in ``out``, in the background (while the killed run goes on: starting
    ``train.py`` is mostly waiting on imports); ``finish_reference`` waits for it."""
    out.mkdir(parents=True)
    log = open(out.parent / f"{out.name}.out", "w")  # noqa: SIM115  (closed by finish_reference)
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={out}"]
    proc = popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, **kwargs)
    proc.log = log
    return proc


def finish_reference(proc: subprocess.Popen) -> None:
    try:
        rc = proc.wait(timeout=600)
    finally:
        proc.log.close()
    assert rc == 0, Path(proc.log.name).read_text()[-4000:]


def run_killed(out: Path, args: list[str], kills: list[tuple[str, int]], before_restart=None, **kwargs) -> list[str]:
    """``train.py <args>`` in ``out``, killed at each of ``kills`` (``(at, step)`` of ``tests.kill.KillAt``) in
    turn and restarted, then once more to the end. ``before_restart(i)`` runs before restart ``i`` (from 1);
    ``kwargs`` go to ``train_py``.

    Returns:
        Each attempt's ``train.log`` lines added by it, as one string per attempt.
    """
    logs, seen = [], 0
    for i, kill in enumerate([*kills, None]):
        if i and before_restart:
            before_restart(i)
        extra = []
        if kill is not None:
            at, step = kill
            extra = [
                "+callbacks.kill._target_=tests.kill.KillAt", f"+callbacks.kill.at={at}",
                f"+callbacks.kill.step={step}", f"+callbacks.kill.marker={out / 'kills' / str(i)}",
            ]  # fmt: skip
        proc = train_py(*args, f"hydra.run.dir={out}", *extra, **kwargs)
        text = (out / "train.log").read_text() if (out / "train.log").exists() else ""
        logs.append(text[seen:])
        seen = len(text)
        if kill is None:
            assert proc.returncode == 0, proc.stderr[-4000:]
        else:
            assert proc.returncode == -9, f"not killed at {kill} (rc {proc.returncode}): {proc.stderr[-3000:]}"
    return logs
