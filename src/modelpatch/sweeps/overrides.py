"""W&B sweeps as Hydra runs: a run's W&B parameters as Hydra overrides.

:func:`hydra_overrides`: the parameters W&B hands a run (``${args_json}``) as overrides ``train.py`` reads
back as the same values and types (``None`` -> ``null``, booleans, lists, strings such as ``bn+dw``, keys the
config does not have yet). The sweep files' ``command`` runs ``python -m modelpatch.sweep run ${program}
${args_json}``, which turns them into ``train.py``'s command line; W&B's own ``${args_no_hyphens}`` writes
``None`` (a string to Hydra) and needs ``+`` for new keys.
"""

from __future__ import annotations

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
