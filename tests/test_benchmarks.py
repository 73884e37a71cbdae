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


def test_noisy_cifar_quick_mode_trains_and_tabulates(tmp_path):
    """The noisy-label benchmark on a generated image folder (the real one reads the shared CIFAR-10 JPEG copy)."""
    from fakes import write_image_folder

    write_image_folder(tmp_path / "images", classes=tuple("abcd"), n_per_class=16, ext=".jpg")
    command = [sys.executable, str(ROOT / "benchmarks" / "noisy_cifar.py"), "--quick", "--data", str(tmp_path / "images"),
               "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
               "--methods", "ce", "hrp_ema=hrp,reliability_momentum=0.5"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert "FAILED" not in result.stdout, result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| sym50")]
    assert [row.split("|")[2].strip() for row in rows] == ["ce", "hrp_ema"]
    assert all(row.split("|")[3].strip() == "1" for row in rows)  # one seed finished for each
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.stdout.count("done before, skipped") == 2  # finished runs are not trained again
