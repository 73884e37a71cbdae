"""Every benchmark's --quick mode runs, so the benchmarks cannot rot (timings are not asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["train_step", "meta_grad", "evaluate"])
def test_quick_mode_runs_and_prints_ratios(name):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert "x" in last and any(ch.isdigit() for ch in last), result.stdout[-2000:]
