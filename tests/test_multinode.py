"""Several nodes on one machine: each "node" is a ``train.py`` process started here with the environment
Lightning's cluster environment reads on a real cluster (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), gloo on the CPU. A 2-node x 1-device run must train like a 1-node x 2-device
run with the same seed, keep the same weights on both nodes, train each ``per_device`` task on its own rank,
write every output once (global rank 0) and resume from the same checkpoint on every rank."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from modelpatch.cluster.ranks import launch_rank
from modelpatch.reporting.report import main as report_main
from modelpatch.run import extras

from .support import ROOT, SMALL_MIX, TINY

TASKS = ("fmnist_b", "digits")
RUN = [
    *(o for o in TINY if not o.startswith(("trainer.devices", "trainer.accelerator", "logger="))),
    *SMALL_MIX[:4],
    f"task.tasks=[{','.join(TASKS)}]",
    "patch=bn",
    "patch.train_shared=true",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "threads=1",
]
CLUSTER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    """This environment without any cluster's variables (a test may itself run inside a SLURM job)."""
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV and not k.startswith(("SLURM_", "SUBMITIT_"))}
    return env | {"OMP_NUM_THREADS": "1"}


def train_nodes(
    *args: str, out: Path, probe: Path, nodes: int, devices: int, timeout: int = 300
) -> list[subprocess.CompletedProcess]:
    """``trainer.num_nodes=nodes trainer.devices=devices``: one ``train.py`` per node with ``nodes > 1`` (each
    told its ``NODE_RANK``), else one that starts its devices' processes itself (Lightning's launcher)."""
    probe_args = ["+callbacks.probe._target_=tests.node_probe.NodeProbe", f"+callbacks.probe.out_dir={probe}"]
    shape = [f"trainer.num_nodes={nodes}", f"trainer.devices={devices}", f"hydra.run.dir={out}"]
    cmd = [sys.executable, str(ROOT / "train.py"), *RUN, *args, *shape, *probe_args]
    if nodes == 1:
        return [subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=timeout)]
    port = str(free_port())
    cluster = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(nodes * devices), "LOCAL_RANK": "0"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=base_env() | cluster | {"NODE_RANK": str(n)}, **pipes) for n in range(nodes)
    ]
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def check_ok(procs: list[subprocess.CompletedProcess]) -> None:
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {rank}: {proc.stderr[-4000:]}"


def read_probes(probe: Path) -> list[dict]:
    return [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]


def last_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mixing", ["all", "per_device"])
def test_two_nodes_train_like_one_node_with_two_devices(tmp_path, data_dir, wandb_env, mixing):
    args = [f"task.mixing={mixing}", f"paths.data_dir={data_dir}"]
    nodes_out, nodes_probe = tmp_path / "nodes2", tmp_path / "probe2"
    check_ok(train_nodes(*args, "logger=wandb", out=nodes_out, probe=nodes_probe, nodes=2, devices=1))
    one_out, one_probe = tmp_path / "nodes1", tmp_path / "probe1"
    check_ok(train_nodes(*args, out=one_out, probe=one_probe, nodes=1, devices=2))

    ranks, one_ranks = read_probes(nodes_probe), read_probes(one_probe)
    where = [(r["rank"], r["node_rank"], r["local_rank"], r["world_size"]) for r in ranks]
    assert where == [(0, 0, 0, 2), (1, 1, 0, 2)]
    assert [(r["node_rank"], r["local_rank"]) for r in one_ranks] == [(0, 0), (0, 1)]
    # each rank's own losses: per_device trains task r on rank r, all trains every task on every rank
    trained = [[TASKS[0]], [TASKS[1]]] if mixing == "per_device" else [sorted(TASKS)] * 2
    assert [r["trained"] for r in ranks] == trained == [r["trained"] for r in one_ranks]
    for part in ("shared", "patches", "heads"):  # the same weights and statistics on both nodes
        assert ranks[0][part] == ranks[1][part], part

    # the same training as one node with two devices (same seed), within fp32 rounding
    two, one = last_state(nodes_out), last_state(one_out)
    assert two.keys() == one.keys()
    diff = max((two[k].double() - one[k].double()).abs().max().item() for k in two if two[k].is_floating_point())
    assert diff <= 1e-5, diff
    res2, res1 = (json.loads((o / "results.json").read_text()) for o in (nodes_out, one_out))
    for task in TASKS:
        assert res2["tasks"][task]["test_acc"] == pytest.approx(res1["tasks"][task]["test_acc"], abs=1e-6)
    print(
        f"\n[{mixing}] 2 nodes x 1 device: test_acc {res2['test_acc']:.4f} "
        + " ".join(f"{t} {res2['tasks'][t]['test_acc']:.4f}" for t in TASKS)
        + f" | 1 node x 2 devices: test_acc {res1['test_acc']:.4f} "
        + " ".join(f"{t} {res1['tasks'][t]['test_acc']:.4f}" for t in TASKS)
        + f" | max |weight difference| {diff:.2e}; bit-identical: {ranks[0]['shared'] == one_ranks[0]['shared']}"
    )

    # exactly one writer (global rank 0): one of each output
    files = [p.relative_to(nodes_out).as_posix() for p in nodes_out.rglob("*") if p.is_file()]
    print("2-node run's files:", sorted(f for f in files if "/files/" not in f and "/logs/" not in f))
    assert [f for f in files if f.endswith("results.json")] == ["results.json"]
    # base.safetensors: the shared weights (patch.train_shared=true)
    patch_files = ["patches/base.safetensors", *(f"patches/{t}.safetensors" for t in sorted(TASKS))]
    assert sorted(f for f in files if f.endswith(".safetensors")) == patch_files
    assert sorted(f for f in files if f.endswith(".ckpt")) == ["checkpoints/best.ckpt", "checkpoints/last.ckpt"]
    assert len(list((nodes_out / "wandb").glob("offline-run-*"))) == 1
    assert len([f for f in files if f.endswith("metrics.csv")]) == 1
    assert sorted(f for f in files if f.endswith((".log", ".yaml")) and "/" not in f) == [
        "config.yaml", "train.log", "train.rank1.0.log",  # node 1 logs to its own file
    ]  # fmt: skip
    assert (nodes_out / "train.log").read_text().count("params: total") == 1
    assert report_main([str(nodes_out)]) == 0
    rows = list(csv.DictReader((nodes_out / "report.csv").open()))
    assert sorted(r["task"] for r in rows) == sorted(TASKS)  # the report: one row per task of the one run


@pytest.mark.parametrize(
    ("env", "rank"),
    [({}, "0"), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, "1.0"), ({"LOCAL_RANK": "1"}, "0.1"),
     ({"SLURM_PROCID": "3", "LOCAL_RANK": "1"}, "3"), ({"RANK": "0", "NODE_RANK": "0"}, "0")],
)  # fmt: skip
def test_the_launch_rank_decides_who_writes_before_the_trainer_exists(monkeypatch, make_cfg, tmp_path, env, rank):
    for key in (*CLUSTER_ENV, "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_rank() == rank
    assert OmegaConf.create({"d": "${mp.rank_zero_only:.hydra}", "s": "${mp.rank_suffix:}"}) == (
        {"d": ".hydra", "s": ""} if rank == "0" else {"d": None, "s": f".rank{rank}"}
    )
    cfg = make_cfg()
    extras(cfg)  # config.yaml: rank zero only
    assert (tmp_path / "run" / "config.yaml").exists() == (rank == "0")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_requeued_two_node_run_resumes_from_the_same_checkpoint_on_every_rank(tmp_path, data_dir):
    """A requeued job starts the same command again in the same folder: every rank must pick the same
    checkpoint (train.py resumes from ``last.ckpt``), or the ranks would train from different weights."""
    out, probe = tmp_path / "run", tmp_path / "probe"
    args = ["task.mixing=per_device", f"paths.data_dir={data_dir}"]
    check_ok(train_nodes(*args, out=out, probe=probe / "first", nodes=2, devices=1))
    steps = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    check_ok(train_nodes(*args, "trainer.max_epochs=2", out=out, probe=probe / "again", nodes=2, devices=1))
    first, again = read_probes(probe / "first"), read_probes(probe / "again")
    assert [r["ckpt_path"] for r in first] == [None, None]
    assert [r["ckpt_path"] for r in again] == [str(out / "checkpoints" / "last.ckpt")] * 2
    assert [r["start_step"] for r in again] == [steps, steps] and steps > 0
    assert [r["end_step"] for r in again] == [2 * steps] * 2
    assert again[0]["shared"] == again[1]["shared"] and again[0]["patches"] == again[1]["patches"]
