"""Every benchmark's --quick mode runs, so the benchmarks cannot rot (timings are not asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["train_step", "meta_grad", "evaluate"])
def test_quick_mode_runs_and_prints_ratios(name):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert "x" in last and any(ch.isdigit() for ch in last), result.stdout[-2000:]
    if name == "train_step":  # one epoch of every method, its pass over the set included, beside CE's
        table = result.stdout.split("one epoch of", 1)[-1]
        rows = {line.split()[0] for line in table.splitlines() if line.strip()}
        for method in ("ce", "hrp", "hrp_double_backward", "dividemix", "l2b", "unicon", "promix"):
            assert method in rows, result.stdout[-2000:]


def test_gpu_session_quick_mode_times_prepares_sweeps_and_summarises(tmp_path):
    """benchmarks/gpu_session.sh --quick: the GPU session's steps on CPU, on a generated image folder in the layout
    of the CIFAR-10 JPEG copy (the real run reads the shared one)."""
    from fakes import write_image_folder

    write_image_folder(tmp_path / "images", classes=tuple("abcdefghij"), n_per_class=12, ext=".jpg")
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "OMP_NUM_THREADS": "1",
        "PY": sys.executable,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--quick", str(tmp_path / "images")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert "hrp/base" in result.stdout and "hrp/ce" in result.stdout
    assert "8 done, 0 running, 0 pending, 0 failed" in result.stdout, result.stdout[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert all(
        f"| {noise} | {method} |" in summary
        for noise in ("sym50", "sym80")
        for method in ("ce", "hrp", "hrp_meta_weighted", "dividemix")
    )


def _load_benchmark(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reliability_probe_tabulates_every_signal_of_a_trained_run(tmp_path):
    from fakes import write_image_folder

    write_image_folder(tmp_path / "images", classes=tuple("abcd"), n_per_class=16, ext=".jpg")
    train = [
        sys.executable,
        "-m",
        "hrp_ood",
        "train",
        "--dataset",
        "folder",
        "--data-root",
        str(tmp_path / "images"),
        "--model",
        "small_cnn",
        "--noise",
        "sym50",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--meta-size",
        "8",
        "--out-dir",
        str(tmp_path),
        "--name",
        "run",
        "--no-progress",
        "--set",
        "meta_batch_size=8",
        "--set",
        "lr_milestones=[]",
        "--set",
        "warmup_epochs=1",
        "--set",
        "ramp_epochs=1",
    ]
    trained = subprocess.run(train, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reliability_probe.py"), str(tmp_path / "run"), "--limit", "32"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:5]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "signal" not in line
    }
    assert list(rows) == ["alpha_batch", "alpha_meta_set", "alpha_calibrated", "small_loss"]
    assert all(0 <= float(cells[0]) <= 100 for cells in rows.values())
    assert rows["small_loss"][1].strip() == "nan"  # the clamp applies to the meta-gradient signals only


def test_probe_anatomy_separates_the_sign_from_the_magnitude():
    probe = _load_benchmark("reliability_probe")
    clean = np.array([1, 1, 1, 0, 0])
    score = np.array([0.1, 0.1, -0.1, 2.0, -2.0])  # clean: small, mostly positive; corrupted: large, either sign
    mass, signs, magnitude = (cell.strip() for cell in probe.sign_and_magnitude(clean, score).split("|"))
    assert float(mass) == pytest.approx(0.2 / 2.2, abs=0.005)  # the clamp hands most of the mass to a corrupted label
    assert signs == "0.67 / 0.50"
    assert float(magnitude) == 100.0
