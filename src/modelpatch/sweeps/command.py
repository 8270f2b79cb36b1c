"""The ``python -m modelpatch.sweep`` command: ``run`` (one run of a W&B agent: its parameters as train.py's
Hydra overrides), ``agent`` (a server-less agent here, :mod:`modelpatch.sweeps.folder`) and ``agents`` (N agents
as a SLURM array job, :mod:`modelpatch.sweeps.agents`).

The sweep files' ``command`` runs ``python -m modelpatch.sweep run ${program} ${args_json}``; W&B's own
``${args_no_hyphens}`` writes ``None`` (a string to Hydra) and needs ``+`` for new keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from modelpatch.atomic import atomic_write
from modelpatch.sweeps.agents import AgentResources, agent_command, sbatch_script, submit
from modelpatch.sweeps.folder import agent, open_sweep
from modelpatch.sweeps.overrides import SweepError, program_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelpatch.sweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="one run of a W&B agent: ${program} ${args_json} as Hydra overrides (exec)")
    p.add_argument("program")
    p.add_argument("args_json")
    p.add_argument("overrides", nargs="*")
    for name, helptext in [
        ("agent", "a server-less agent here: claim runs and train them one by one"),
        ("agents", "N agents as a SLURM array job (of a sweep file, a sweep folder or a W&B sweep id)"),
    ]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "sweep", help="a sweep file (sweeps/*.yaml), a sweep folder" + (", a W&B sweep id" * (name == "agents"))
        )
        p.add_argument("overrides", nargs="*", help="Hydra overrides every run gets (a new sweep folder only)")
        p.add_argument("--dir", help="the sweep folder of a sweep file (default: runs/sweeps/<sweep name>)")
        p.add_argument("--count", type=int, help="runs per agent (default: until the sweep is done)")
    p.add_argument("--agents", type=int, required=True, help="agents (array tasks)")
    p.add_argument("--partition")
    p.add_argument("--time", type=int, dest="time_min", help="minutes per agent")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem-gb", type=int)
    p.add_argument("--gpus-per-task", type=int)
    p.add_argument("--sbatch", action="append", default=[], help="another #SBATCH option, e.g. --sbatch=--qos=low")
    p.add_argument("--wait", action="store_true", help="return when every agent has ended")
    p.add_argument("--dry-run", action="store_true", help="write the script, do not submit it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    try:
        if args.cmd == "run":
            cmd = program_command(args.program, json.loads(args.args_json), args.overrides)
            os.execv(cmd[0], cmd)
        if args.cmd == "agent":
            failed = agent(open_sweep(args.sweep, args.dir, args.overrides), args.count)
            print(f"failed runs: {failed}" if failed else "agent done")
            return 1 if failed else 0
        is_id = not Path(args.sweep).exists()
        if is_id and args.overrides:
            raise SweepError("a W&B sweep's runs take their overrides from the sweep file, not from this command")
        target = args.sweep if is_id else str(open_sweep(args.sweep, args.dir, args.overrides))
        logs = Path(args.dir or (f"runs/agents/{args.sweep.split('/')[-1]}" if is_id else target)).resolve()
        name = f"agents-{Path(target).name}"
        resources = AgentResources(args.partition, args.time_min, args.cpus_per_task, args.mem_gb, args.gpus_per_task)
        resources.extra = args.sbatch
        logs.mkdir(parents=True, exist_ok=True)
        script = logs / "agents.sbatch"
        text = sbatch_script(agent_command(target, args.count), args.agents, logs, resources, name)
        atomic_write(script, lambda tmp: tmp.write_text(text))
        print(f"written: {script}")
        if not args.dry_run:
            job = submit(script, wait=args.wait)
            print(f"submitted array job {job}: {args.agents} agents; logs {logs}/{job}_<agent>.out")
        return 0
    except (SweepError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
