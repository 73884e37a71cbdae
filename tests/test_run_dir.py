"""Issue 11: the run folder. Nothing outside `--out-dir` is touched, `--overwrite` removes only a run of ours,
one process at a time, a run killed before its first checkpoint starts again, crashes leave no temporary files
and no metrics.csv row ahead of last.pt. Every test runs the real CLI (`hrp_ood.cli.main`) in-process."""

from __future__ import annotations

import csv
import os
import stat

import pytest
from conftest import tiny_train_args
from hrp_ood.train import trainer as trainer_module

from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.data.noise import load_noise
from hrp_ood.run_dir import RunFolder

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

TINY = tiny_train_args(method="ce")


class Crash(Exception):
    """Stands for the process dying at that point (SIGKILL, power loss)."""


@pytest.fixture(scope="module")
def cifar_root(make_cifar_root):
    return make_cifar_root(100, 30)


def train_args(cifar_root, out_dir, *extra, epochs=1):
    return [
        "train",
        "--data-root",
        str(cifar_root),
        "--out-dir",
        str(out_dir),
        "--name",
        "run",
        "--epochs",
        str(epochs),
        *TINY,
        *extra,
    ]


def files(folder):
    """{name: bytes} of every file directly in `folder`."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def metric_epochs(run):
    with (run / "metrics.csv").open(newline="") as f:
        return [row["epoch"] for row in csv.DictReader(f)]


def crash_on_call(monkeypatch, owner, name, call):
    """Make owner.name raise Crash on its `call`-th call (1-based); earlier calls run the real function."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Crash(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("name", ["../outside", "{root}/outside", "a/../../outside", ".", "..", ""])
def test_a_run_name_is_one_folder_name_and_overwrite_never_reaches_outside(name, cifar_root, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "thesis.tex").write_text("years of work")
    out_dir = tmp_path / "runs"
    args = train_args(cifar_root, out_dir, "--overwrite")
    args[args.index("--name") + 1] = name.format(root=tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must be one folder name" in err and "--out-dir" in err, err
    assert (outside / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"], "nothing is created"


def test_overwrite_removes_only_a_run_of_ours_and_says_what_it_removes(cifar_root, tmp_path, capsys):
    args = train_args(cifar_root, tmp_path)
    assert main(args) == 0
    run = tmp_path / "run"
    (run / "notes.txt").write_text("my notes")
    before = files(run)
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds files that are not part of an hrp-ood run (notes.txt)" in err and len(err.splitlines()) == 1
    assert files(run) == before

    (run / "notes.txt").unlink()
    assert main([*args, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"--overwrite: replaced the run in {run}; removed " in err and "last.pt" in err and "metrics.csv" in err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and metric_epochs(run) == ["1"]
    assert not (run / ".replaced").exists()


def test_a_second_process_on_the_run_folder_fails_naming_the_holders_pid(cifar_root, tmp_path, capsys):
    assert main(train_args(cifar_root, tmp_path)) == 0
    run = tmp_path / "run"
    holder = RunFolder(run)  # what a `train` process holds while it runs
    assert holder.claim(resume=True, overwrite=False) is True
    before = files(run)
    capsys.readouterr()
    try:
        for extra in (["--resume"], ["--overwrite"]):
            assert main(train_args(cifar_root, tmp_path, *extra, epochs=2)) == 2
            err = capsys.readouterr().err.strip()
            assert err == (
                f"hrp-ood train: error: run folder {run} is in use by another `hrp-ood train` "
                f"(pid {os.getpid()}); wait for it to end, or train under another --name"
            )
            assert files(run) == before
    finally:
        holder.release()
    assert main(train_args(cifar_root, tmp_path, "--resume", epochs=2)) == 0, "the folder is free once released"


@pytest.mark.parametrize("second", [[], ["--resume"]], ids=["start-again", "resume"])
def test_a_run_killed_before_its_first_checkpoint_is_started_again(second, cifar_root, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        crash_on_call(patch, trainer_module, "save_checkpoint", 1)
        with pytest.raises(Crash):
            main(train_args(cifar_root, tmp_path, "--noise", "sym50"))
    run = tmp_path / "run"
    assert not (run / "last.pt").exists() and (run / "noise.npz").exists()
    capsys.readouterr()
    # starting again takes the new command's config; --resume the saved one (there is no checkpoint to read it from)
    noise = "sym20" if not second else "sym50"
    command = (
        train_args(cifar_root, tmp_path, "--noise", "sym20")
        if not second
        else ["train", "--out-dir", str(tmp_path), "--name", "run", "--resume", "--no-progress"]
    )
    assert main(command) == 0
    err = capsys.readouterr().err
    assert f"run folder {run} holds a run that stopped before its first checkpoint: starting it again" in err
    assert ("--resume has nothing to resume" in err) == bool(second)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert load_noise(run / "noise.npz")[2]["spec"] == noise


def test_temporary_files_of_interrupted_writes_are_removed_at_the_next_start(cifar_root, tmp_path, capsys):
    assert main(train_args(cifar_root, tmp_path)) == 0
    run = tmp_path / "run"
    stale = [".last.pt.k2j4h5.tmp", ".best.pt.tmp", ".best.pt.x8f1a0.tmp", ".metrics.csv.a1b2c3.tmp", "noise.npz.tmp"]
    for name in stale:
        (run / name).write_bytes(b"torn")
    capsys.readouterr()
    assert main(train_args(cifar_root, tmp_path, "--resume", epochs=2)) == 0
    assert not [name for name in stale if (run / name).exists()]
    assert "removed 5 temporary file(s) left by an interrupted write" in capsys.readouterr().err


def test_run_files_get_the_permissions_of_the_umask(cifar_root, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(train_args(cifar_root, tmp_path)) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert {name for name, mode in modes.items() if mode != 0o644} == set(), modes


def test_metrics_csv_is_never_ahead_of_last_pt_after_a_crash(cifar_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # the process dies while writing epoch 2's checkpoint
        crash_on_call(patch, trainer_module, "save_checkpoint", 2)
        with pytest.raises(Crash):
            main(train_args(cifar_root, tmp_path, epochs=3))
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert metric_epochs(run) == ["1"]
    assert main(train_args(cifar_root, tmp_path, "--resume", epochs=3)) == 0
    assert metric_epochs(run) == ["1", "2", "3"]


def test_a_crash_between_last_pt_and_metrics_csv_loses_no_row(cifar_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:  # the process dies after epoch 2's checkpoint, before its metrics row
        crash_on_call(patch, trainer_module.MetricsLog, "append", 2)
        with pytest.raises(Crash):
            main(train_args(cifar_root, tmp_path, epochs=3))
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and metric_epochs(run) == ["1"]
    assert main(train_args(cifar_root, tmp_path, "--resume", epochs=3)) == 0
    assert metric_epochs(run) == ["1", "2", "3"]
    with (run / "metrics.csv").open(newline="") as f:
        assert list(csv.DictReader(f))[1]["loss"] == state["metrics_row"]["loss"]
