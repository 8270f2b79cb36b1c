"""W&B sweeps as Hydra runs: a run's W&B parameters as Hydra overrides, and the ``python -m modelpatch.sweep``
command (``run``: one run of a W&B agent; ``agent``/``agents``: server-less agents, :mod:`modelpatch.sweep_folder`).

:func:`hydra_overrides`: the parameters W&B hands a run (``${args_json}``) as overrides ``train.py`` reads
back as the same values and types (``None`` -> ``null``, booleans, lists, strings such as ``bn+dw``, keys the
config does not have yet). The sweep files' ``command`` runs ``python -m modelpatch.sweep run ${program}
${args_json}``, which turns them into ``train.py``'s command line; W&B's own ``${args_no_hyphens}`` writes
``None`` (a string to Hydra) and needs ``+`` for new keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class SweepError(ValueError):
    """A sweep file, folder or option that cannot be used."""


# --- W&B parameters -> Hydra overrides -------------------------------------------------------------------


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters (a W&B sweep's ``parameters:`` inside a parameter) as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not name.startswith(("+", "~")):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override syntax, read back as the same value and type (strings quoted)."""
    from hydra.core.override_parser.types import Override, Quote, QuotedString

    def quoted(v: Any) -> Any:
        if isinstance(v, str):
            return QuotedString(text=v, quote=Quote.single)
        if isinstance(v, list | tuple):
            return [quoted(x) for x in v]
        if isinstance(v, dict):
            return {str(k): quoted(x) for k, x in v.items()}
        return v

    return Override._get_value_element_as_str(quoted(value))


def hydra_overrides(params: dict[str, Any], groups: set[str]) -> list[str]:
    """A run's parameters (``{name: value}``) as Hydra overrides: ``group=option`` for a config group
    (``patch=bn+dw``), ``++key=value`` (set, or add if absent) for any other key; a name that starts with
    ``+`` or ``~`` is used as written."""
    from hydra.core.override_parser.types import Override

    out = []
    for key, value in flatten(params).items():
        if key.startswith(("+", "~")):
            out.append(f"{key}={hydra_value(value)}")
        elif key in groups:
            out.append(f"{key}={Override._get_value_element_as_str(value)}")
        else:
            out.append(f"++{key}={hydra_value(value)}")
    return out


def all_groups(loader: Any, parent: str = "") -> set[str]:
    """Every config group a Hydra config loader knows (``patch``, ``hydra/launcher``, ...)."""
    out = set()
    for name in loader.list_groups(parent):
        path = f"{parent}/{name}" if parent else name
        out |= {path, *all_groups(loader, path)}
    return out


def config_groups(config_dir: str | Path) -> set[str]:
    """Every config group of the configs in ``config_dir``, with Hydra's own and its plugins'."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            return all_groups(GlobalHydra.instance().config_loader())
    finally:
        GlobalHydra.instance().clear()


def program_command(program: str, params: dict[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """The command line of one run: this Python, ``program`` (train.py, its configs in ``conf/`` beside
    it), the parameters as Hydra overrides, then ``extra`` overrides."""
    if not Path(program).is_file():
        raise SweepError(f"program {program!r} not found from {Path.cwd()}: run the agent in the repository root")
    groups = config_groups(Path(program).resolve().parent / "conf")
    return [sys.executable, program, *hydra_overrides(params, groups), *extra]


# --- command line ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    from modelpatch.agents import AgentResources, agent_command, sbatch_script, submit
    from modelpatch.sweep_folder import agent, open_sweep

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
    p.add_argument("--wait", action="store_true", help="return when every agent has ended (sbatch --wait)")
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
        script.write_text(sbatch_script(agent_command(target, args.count), args.agents, logs, resources, name))
        print(f"written: {script}")
        if not args.dry_run:
            job = submit(script, wait=args.wait)
            print(f"submitted array job {job}: {args.agents} agents; logs {logs}/{job}_<agent>.out")
        return 0
    except (SweepError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
