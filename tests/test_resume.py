"""An interrupted run resumes to bit-identical weights: SIGKILL (lose the epoch in flight) and SIGTERM
(checkpoint mid-epoch, exit non-zero with a resume hint) on a real `hrp-ood train` subprocess."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import tiny_train_args
from hrp_ood.train.trainer import resume_config

from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.config import build_config
from hrp_ood.errors import UserError
from hrp_ood.eval.network import checkpoint_config

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

EPOCHS = 4
ARGS = [
    "--model",
    "small_cnn",
    "--batch-size",
    "16",
    "--meta-size",
    "20",
    "--set",
    "meta_batch_size=16",
    "--set",
    "warmup_epochs=1",
    "--set",
    "ramp_epochs=2",
    "--set",
    "lr_milestones=[3]",
    "--set",
    "proj_hidden_dim=32",
    "--set",
    "proj_dim=16",
    "--set",
    "tau_conf=0.3",
    "--set",
    "deterministic=true",
    "--epochs",
    str(EPOCHS),
    "--no-progress",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_root(make_cifar_root):
    return make_cifar_root(260, 40, seed=1)


def train_command(data_root, out_dir, *extra):
    return [
        sys.executable,
        "-m",
        "hrp_ood",
        "train",
        "--data-root",
        str(data_root),
        "--out-dir",
        str(out_dir),
        "--name",
        "run",
        *ARGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def reference_weights(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(train_command(data_root, out), env=ENV, check=True, capture_output=True)
    return load_checkpoint(out / "run" / "last.pt")["nets"]


def wait_until(condition, process, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.01)


def assert_identical(nets_a, nets_b):
    for a, b in zip(nets_a, nets_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_interrupt_then_resume_is_bit_identical(how, data_root, reference_weights, tmp_path):
    process = subprocess.Popen(
        train_command(data_root, tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # epoch 1 is done (its log line comes after last.pt and metrics.csv); kill inside epoch 2: a signal
    # that lands before its first step checkpoints at the epoch boundary (step 0), so give the epoch a moment to start
    log = tmp_path / "run" / "train.log"
    wait_until(lambda: log.exists() and "epoch 1/" in log.read_text(), process, "epoch 1's log line")
    time.sleep(0.2)
    process.send_signal(how)
    _, err = process.communicate(timeout=120)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] < EPOCHS
    if how == signal.SIGTERM:  # checkpointed after the step in flight, with a one-line resume hint
        assert process.returncode == 128 + signal.SIGTERM
        assert "--resume" in err.strip().splitlines()[-1]
        assert state["step"] > 0, "the SIGTERM checkpoint is a mid-epoch one"
    resumed = subprocess.run(train_command(data_root, tmp_path, "--resume"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(load_checkpoint(tmp_path / "run" / "last.pt")["nets"], reference_weights)


def saved_by_version_0_1_of_2026_12_01(tmp_path):
    """A run folder as the previous version wrote it: its defaults then (meta-weighted L_CE, the coupled normaliser)
    written out in config.yaml, and none of the keys added since (meta_bn, crop_padding, flip)."""
    values = {**dataclasses.asdict(build_config()), "ce_loss": "meta_weighted", "normalization": "coupled"}
    for key in ("meta_bn", "crop_padding", "flip"):
        del values[key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    return values


def test_a_run_saved_with_earlier_defaults_resumes_with_what_it_trained_with(tmp_path):
    saved_by_version_0_1_of_2026_12_01(tmp_path)
    assert (build_config().ce_loss, build_config().normalization) == ("refined", "separate")  # today's defaults
    resumed = resume_config(tmp_path, build_config(), explicit=set())
    assert (resumed.spec.ce_loss, resumed.spec.normalization) == ("meta_weighted", "coupled")
    assert (resumed.meta_bn, resumed.crop_padding, resumed.flip) == ("eval", 4, True)  # BEHAVIOUR_BEFORE_KEY
    # a sweep names every key: the old run matches an experiment that asks for meta_weighted, and no other
    assert (
        resume_config(
            tmp_path,
            build_config(overrides={"ce_loss": "meta_weighted", "normalization": "coupled"}),
            explicit={"ce_loss", "normalization"},
        ).ce_loss
        == "meta_weighted"
    )
    with pytest.raises(UserError, match="ce_loss differ"):
        resume_config(tmp_path, build_config(), explicit={"ce_loss"})


def test_a_checkpoint_saved_with_earlier_defaults_evaluates_with_them(tmp_path):
    values = saved_by_version_0_1_of_2026_12_01(tmp_path)
    state = {"config": values, "dataset": {}, "nets": [], "epoch": 1}
    saved = checkpoint_config(state, tmp_path / "last.pt")
    assert (saved.spec.ce_loss, saved.spec.normalization, saved.meta_bn) == ("meta_weighted", "coupled", "eval")


def test_a_config_saved_by_a_newer_version_is_a_one_line_error(tmp_path):
    values = dataclasses.asdict(build_config())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**values, "future_knob": 3}))
    with pytest.raises(UserError, match=r"config has future_knob, unknown to this version of hrp-ood"):
        resume_config(tmp_path, build_config(), explicit=set())
    state = {"config": {**values, "future_knob": 3}, "dataset": {}, "nets": [], "epoch": 1}
    with pytest.raises(UserError, match=r"last.pt: its config has future_knob"):
        checkpoint_config(state, tmp_path / "last.pt")


def test_resume_refuses_an_edited_config_file_like_the_same_flag(make_cifar_root, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.05\nweight_decay: 0.0005\n")
    argv = ["train", "--config", str(config), "--data-root", str(make_cifar_root()), "--out-dir", str(tmp_path)]
    argv += ["--name", "run", *tiny_train_args(), "--epochs", "1"]
    assert main(argv) == 0
    last = tmp_path / "run" / "last.pt"
    before = last.stat().st_mtime_ns
    config.write_text("lr: 0.1\nweight_decay: 0.0005\n")
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "lr differ(s) from it" in error and "--config" in error
    assert last.stat().st_mtime_ns == before
    config.write_text("lr: 0.05\nweight_decay: 0.0005\n")  # the file as the run was started: it resumes
    assert main([*argv[:-1], "2", "--resume"]) == 0
    assert load_checkpoint(last)["epoch"] == 2
