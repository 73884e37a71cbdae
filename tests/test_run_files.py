"""Hand-edited or damaged files of a run folder (metrics.csv, signals/) are one line naming the file, never a
traceback, and nothing of the run is changed by the rejected command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hrp_ood.cli import main
from hrp_ood.errors import UserError
from hrp_ood.io import read_metrics_rows

METRICS = "epoch,acc_ensemble,alpha_auroc\n1,50.0,60.0\n2,55.0,62.0\n"


def _run(tmp_path: Path, metrics: bytes = METRICS.encode()) -> Path:
    run = tmp_path / "run"
    (run / "signals").mkdir(parents=True)
    (run / "metrics.csv").write_bytes(metrics)
    return run


def test_metrics_rows_are_read_with_their_epochs(tmp_path):
    rows = read_metrics_rows(_run(tmp_path) / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"] and rows[1]["acc_ensemble"] == "55.0"
    assert read_metrics_rows(tmp_path / "none.csv") == []


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"epoch,acc\n1,50\n2x,51\n", r"metrics.csv line 3: epoch '2x' is not a whole number"),
        (b"epoch,acc\n1,50\n\xb2,51\n", r"metrics.csv is not a readable CSV file \('utf-8' codec"),
        (b"epoch,acc\n1,50\n,51\n", r"metrics.csv line 3: epoch '' is not a whole number"),
        (b"acc\n50\n", r"metrics.csv has no epoch column"),
    ],
)
def test_a_damaged_metrics_file_is_a_user_error_naming_file_and_line(tmp_path, content, words):
    with pytest.raises(UserError, match=words):
        read_metrics_rows(_run(tmp_path, content) / "metrics.csv")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "is not a readable signals file (File is not a zip file)"),  # truncated
        (b"just text", "is not a readable signals file"),
    ],
)
def test_plot_of_a_damaged_signals_file_is_one_line_and_writes_nothing(tmp_path, capsys, content, words):
    run = _run(tmp_path)
    signals = run / "signals" / "epoch_0002.npz"
    np.savez(signals, alpha=np.ones(10, dtype=np.float32))
    signals.write_bytes(content if content is not None else signals.read_bytes()[:40])
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "epoch_0002.npz" in err and words in err, err
    assert not (run / "plots").exists()


def test_plot_ignores_files_in_signals_that_are_not_the_trainers(tmp_path):
    run = _run(tmp_path)
    for stray in ("epoch_0002.npz.bak", "epoch_notes.npz", "readme.txt"):
        (run / "signals" / stray).write_text("not signals")
    assert main(["plot", str(run)]) == 0
    assert {p.name for p in (run / "plots").iterdir()} == {"reliability_auroc.png", "cdcl_purity.png", "gate.png"}


def test_a_run_name_too_long_for_its_files_is_refused_when_the_config_is_read():
    from hrp_ood.config import build_config

    assert build_config(overrides={"name": "é" * 100}).name == "é" * 100  # 200 bytes: fits
    with pytest.raises(UserError, match=r"is 202 bytes, over 200: .*choose a shorter --name"):
        build_config(overrides={"name": "é" * 101})
