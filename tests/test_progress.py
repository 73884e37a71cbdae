"""Issue 11: output in normal use. Off a terminal a training run logs its progress at a steady interval (no
carriage-return bars), and torch's FutureWarning about its own use of torch.jit.script never reaches the user."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from conftest import tiny_train_args

from hrp_ood import progress as progress_module
from hrp_ood.cli import main
from hrp_ood.progress import ProgressLog, format_duration

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

TINY = tiny_train_args(batch_size=16, small_head=True)


@pytest.fixture(scope="module")
def cifar_root(make_cifar_root):
    return make_cifar_root(100, 20)


class FakeClock:
    def __init__(self, step_s: float):
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def test_progress_log_writes_a_line_each_interval_with_rate_and_eta(caplog):
    # every call of the clock advances 10 s: the start, then once per step
    steps = ProgressLog(
        range(2, 10), desc="epoch 3/5", total=10, initial=2, steps_after=20, interval=30, clock=FakeClock(10.0)
    )
    with caplog.at_level(logging.INFO, logger="hrp_ood.progress"):
        assert list(steps) == list(range(2, 10))
    assert caplog.messages == [
        "epoch 3/5: step 5/10, 0.10 it/s, ETA 50s (run 4m10s)",
        "epoch 3/5: step 8/10, 0.10 it/s, ETA 20s (run 3m40s)",
    ]


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (59, "59s"), (61, "1m01s"), (7325, "2h02m")])
def test_durations_read_as_hours_minutes_seconds(seconds, text):
    assert format_duration(seconds) == text


def test_training_off_a_terminal_logs_progress_lines_without_carriage_returns(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)  # a line after every step
    assert (
        main(
            [
                "train",
                "--data-root",
                str(cifar_root),
                "--out-dir",
                str(tmp_path),
                "--name",
                "run",
                "--method",
                "ce",
                "--epochs",
                "2",
                *TINY,
            ]
        )
        == 0
    )
    log_text = (tmp_path / "run" / "train.log").read_text()
    steps = (100 - 20) // 16
    assert "\r" not in log_text
    for epoch in (1, 2):
        lines = [line for line in log_text.splitlines() if f"epoch {epoch}/2: step " in line]
        assert len(lines) == steps, log_text
        assert " it/s, ETA " in lines[-1] and f"step {steps}/{steps}" in lines[-1]
    assert "(run " in log_text, "the first epoch's lines give the ETA of the whole run"


def test_the_meta_step_prints_no_torch_jit_deprecation_warning(cifar_root, tmp_path):
    """A fresh process: torch warns once per process, when forward-mode AD first loads its decompositions (HRP's
    meta step, from the first step with warmup_epochs=0)."""
    command = [
        sys.executable,
        "-W",
        "always::FutureWarning",
        "-m",
        "hrp_ood",
        "train",
        "--data-root",
        str(cifar_root),
        "--out-dir",
        str(tmp_path),
        "--name",
        "run",
        "--epochs",
        "1",
        "--set",
        "warmup_epochs=0",
        *TINY,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "torch.jit.script" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr
