"""The prepared GPU check (bench/gpu_check.py), its smallest CPU path: it runs and every row holds."""

import subprocess
import sys

import pytest

from .support import ROOT


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu():
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick"]
    cmd += ["--only", "step", "savers", "forward_mixed", "cache", "--kinds", "bn", "--saver-kinds", "bn"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "| check |" not in line]
    # 5 settings + savers + mixed + cache
    assert len(rows) == 8 and all(row.endswith("| ok |") for row in rows), rows
    assert "GPU check passed" in proc.stdout
