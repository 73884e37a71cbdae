"""Every benchmark's --quick mode runs, so the benchmarks cannot rot (timings are not asserted)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _load_benchmark(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reliability_probe_tabulates_every_signal_of_a_trained_run(tmp_path):
    from fakes import write_image_folder

    write_image_folder(tmp_path / "images", classes=tuple("abcd"), n_per_class=16, ext=".jpg")
    train = [sys.executable, "-m", "hrp_ood", "train", "--dataset", "folder", "--data-root", str(tmp_path / "images"),
             "--model", "small_cnn", "--noise", "sym50", "--epochs", "2", "--batch-size", "16", "--meta-size", "8",
             "--out-dir", str(tmp_path), "--name", "run", "--no-progress", "--set", "meta_batch_size=8",
             "--set", "lr_milestones=[]", "--set", "warmup_epochs=1", "--set", "ramp_epochs=1"]
    trained = subprocess.run(train, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reliability_probe.py"), str(tmp_path / "run"),
                             "--limit", "32"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in result.stdout.splitlines()
            if line.startswith("| ") and "signal" not in line}
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


def test_noisy_cifar_memorization_preset_sets_the_small_subset_and_keeps_explicit_flags():
    parse_args = _load_benchmark("noisy_cifar").parse_args
    preset = parse_args(["--memorization"])
    assert (preset.train_per_class, preset.epochs, preset.model) == (300, 100, "small_cnn")
    assert preset.set == ["meta_size=200"] and preset.out.name == "noisy_cifar_memorization"
    explicit = parse_args(["--memorization", "--epochs", "60", "--train-per-class", "500", "--set", "meta_size=100"])
    assert (explicit.train_per_class, explicit.epochs) == (500, 60)
    assert explicit.set[-1] == "meta_size=100"  # the later override wins in `hrp-ood train --set`
    default = parse_args([])
    assert (default.train_per_class, default.epochs, default.set) == (1000, 30, [])
    with pytest.raises(SystemExit):
        parse_args(["--memorization", "--full"])


def test_noisy_cifar_table_averages_finished_runs_only(tmp_path):
    bench = _load_benchmark("noisy_cifar")
    args = bench.parse_args(["--out", str(tmp_path), "--methods", "ce", "--noise", "sym80", "--seeds", "0", "1", "2",
                             "--epochs", "3", "--warmup", "1"])
    header = "epoch,acc_ensemble,meta_acc\n"
    (tmp_path / "ce_sym80_s0").mkdir()
    (tmp_path / "ce_sym80_s0" / "metrics.csv").write_text(header + "1,20,30\n2,40,50\n3,30,40\n")
    (tmp_path / "ce_sym80_s1").mkdir()  # stopped at epoch 2 of 3: not in the mean
    (tmp_path / "ce_sym80_s1" / "metrics.csv").write_text(header + "1,10,10\n2,90,90\n")
    row = bench.summary_table(args).splitlines()[-1].split("|")
    assert [cell.strip() for cell in row[1:6]] == ["sym80", "ce", "1 (+1 unfinished)", "30.0", "40.0"]


def test_noisy_cifar_table_selects_on_the_meta_set_only_where_it_is_held_out(tmp_path):
    """ce_meta trains on the meta set: its meta accuracy is a training accuracy, so no meta-selected column."""
    bench = _load_benchmark("noisy_cifar")
    args = bench.parse_args(["--out", str(tmp_path), "--methods", "ce", "ce_meta", "--noise", "sym80", "--seeds", "0",
                             "--epochs", "2", "--warmup", "1"])
    for method in ("ce", "ce_meta"):
        (tmp_path / f"{method}_sym80_s0").mkdir()
        (tmp_path / f"{method}_sym80_s0" / "metrics.csv").write_text("epoch,acc_ensemble,meta_acc\n1,20,90\n2,30,80\n")
    rows = [line.split("|") for line in bench.summary_table(args).splitlines()[-2:]]
    assert [[cell.strip() for cell in row[2:6]] for row in rows] == [["ce", "1", "30.0", "20.0"],
                                                                    ["ce_meta", "1", "30.0", "–"]]
