"""The prepared GPU check (bench/gpu_check.py), its smallest CPU path: it runs and every row holds."""

import subprocess
import sys

import pytest

from .support import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu():
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick"]
    cmd += ["--only", "step", "forward_mixed", "cache", "--kinds", "bn"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "| check |" not in line]
    assert len(rows) == 7 and all(row.endswith("| ok |") for row in rows), rows  # 5 settings + mixed + cache
    assert "GPU check passed" in proc.stdout
