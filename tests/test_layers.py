"""The layering of ``src/modelpatch`` (docs/architecture.md, "Layers"): every import (module-level, function-local
and under ``TYPE_CHECKING``) goes to the importer's own sub-package or to a lower layer, never to a peer of its row
or a higher one; no import cycle; modules of at most 400 lines and functions of at most 60 in ``src/``; every
``_target_`` in conf/ importable."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

from .support import CONF, ROOT

SRC = ROOT / "src" / "modelpatch"
DOC = ROOT / "docs" / "architecture.md"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
KEPT_LONG_FUNCTIONS: dict[str, str] = {}  # "path under src:function" -> why it stays longer (none now)


def layer_table() -> dict[str, int]:
    """Unit (a sub-package or a top-level module of modelpatch) -> its layer, from the doc's table."""
    text = DOC.read_text()
    block = text.split("<!-- layers -->", 1)[1].split("<!-- /layers -->", 1)[0]
    layers = {}
    for row in block.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for unit in re.findall(r"`([\w.]+)/?`", cells[1]):
                layers[unit] = int(cells[0])
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(module: str, path: Path) -> set[str]:
    """Every modelpatch module ``module`` imports, wherever the import statement is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # import a.b.c: the deepest module that exists
                name = name.rpartition(".")[0]
            if name.startswith("modelpatch"):
                found.add(name)
    return found - {module}


GRAPH = {m: imported_modules(m, p) for m, p in MODULES.items()}


def test_the_doc_lists_every_unit_once():
    layers = layer_table()
    units = {unit_of(m) for m in MODULES}
    assert units == set(layers), (
        f"in src, not in the doc: {units - set(layers)}; in the doc only: {set(layers) - units}"
    )


def test_imports_go_only_to_lower_layers():
    layers = layer_table()
    wrong = [
        f"{m} ({layers[unit_of(m)]}) imports {t} ({layers[unit_of(t)]})"
        for m, targets in GRAPH.items()
        for t in sorted(targets)
        if unit_of(t) != unit_of(m) and layers[unit_of(t)] >= layers[unit_of(m)]
    ]
    assert not wrong, "imports against the layers (docs/architecture.md):\n" + "\n".join(wrong)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_and_functions_are_short():
    files = sorted((ROOT / "src").rglob("*.py"))
    long_modules = [f"{p}: {n}" for p in files if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    long_functions = []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                name = f"{p.relative_to(ROOT / 'src')}:{node.name}"
                if length > MAX_FUNCTION_LINES and name not in KEPT_LONG_FUNCTIONS:
                    long_functions.append(f"{name}: {length} lines")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


# a call that writes a file: through modelpatch.atomic's helper it writes the temporary file (``tmp``)
WRITES = re.compile(r"\.write_text\(|\.write_bytes\(|savefig\(|torch\.save\(|save_file\(|open\([^)]*[\"'][wx]b?[\"']")


def test_every_file_is_written_through_the_atomic_helper():
    """A crash never leaves half a file in place: checkpoints, results, patches, logs, reports, sweep files."""
    direct = []
    for p in sorted((ROOT / "src").rglob("*.py")):
        if p.name == "atomic.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if WRITES.search(line) and "tmp" not in line:
                direct.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not direct, "files written in place (use modelpatch.atomic.atomic_write):\n" + "\n".join(direct)


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_target_in_conf_imports(path):
    for target in _targets(yaml.safe_load(path.read_text()) or {}):
        if target.startswith(("modelpatch.", "hydra_plugins.")):
            module, _, name = target.rpartition(".")
            assert hasattr(importlib.import_module(module), name), target
