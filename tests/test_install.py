"""A plain (non-editable) install: the package finds its configs and its report runs without the checkout."""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .support import ROOT

RESULTS = {
    "backbone": {"name": "mobilenet_v2", "width": 0.25, "features": 1280, "weights": "random"},
    "patch": "bn",
    "tasks": {"digits": {"test_acc": 0.5, "val_acc": 0.5, "num_classes": 10, "params_patch": 10, "params_head": 5}},
    "params": {"total": 100},
}


def _run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}: {out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_pip_install_ships_the_configs_and_the_report_runs(tmp_path):
    source = tmp_path / "source"  # a copy: pip builds in the tree it is given
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, dict(os.environ))
    site = site.stdout.strip()
    # this interpreter's packages (torch, hydra, pip) behind the new environment's own, but not its modelpatch:
    # nothing downloaded but what pip's isolated build needs (setuptools)
    deps = [p for p in sys.path if "site-packages" in p and not (Path(p) / "modelpatch").exists()]
    (Path(site) / "zz_dependencies.pth").write_text("\n".join(deps) + "\n")
    work = tmp_path / "work"  # no checkout here: nothing on the path but the installed package
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", str(source)]
    _run(pip, work, env)

    compose = (
        "import modelpatch, modelpatch.config as c; "
        "cfg = c.compose_run_config(['task=digits', 'patch=bn+dw'], 'out'); "
        "print(modelpatch.__file__, c.find_config_dir(), cfg.task.name, cfg.patch.kind, cfg.paths.data_dir)"
    )
    out = _run([python, "-c", compose], work, env)
    module_file, conf, task, patch, data_dir = out.stdout.split()
    assert module_file.startswith(site) and conf == os.path.join(site, "modelpatch", "conf"), out.stdout
    assert (task, patch) == ("digits", "bn+dw")
    assert data_dir == os.environ.get("MODELPATCH_DATA", str(work / "data"))  # the working directory, as in a job

    (work / "run").mkdir()
    (work / "run" / "results.json").write_text(json.dumps(RESULTS))
    report = [python, "-m", "modelpatch.report", "run", "--no-plot"]
    out = _run(report, work, env)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| digits | bn | mobilenet_v2@0.25 |")]
    assert any(r.endswith("| 15 | 100 | 0.5000 | 0.5000 | . |") for r in rows), out.stdout  # the per-run row
