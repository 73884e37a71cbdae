"""TensorBoard logs (train/tensorboard.py): every metrics.csv column and the per-sample signal histograms, read back
with TensorBoard's own event reader; a resumed run logs each epoch once; a sweep's runs under one root named by
their grid point; training without the tensorboard package is unchanged."""

import csv
import logging
import math
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_train_args
from hrp_ood.train.tensorboard import TensorBoardLog, scalar_tag

from hrp_ood.cli import main
from hrp_ood.config import build_config
from hrp_ood.errors import UserError
from hrp_ood.trainers.signals import EpochSignals

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TINY = tiny_train_args(hrp=True)  # past the warm-up in epoch 2: α, β, T and every HRP term are logged
HISTOGRAMS = [f"signals/{name}{part}" for name in ("alpha", "beta", "T", "loss") for part in ("", "_clean", "_noisy")]


def read_events(folder):
    """Every event of a TensorBoard log folder (all files), as TensorBoard loads them (purges applied)."""
    events = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0}
    )
    events.Reload()
    return events


def scalars(events):
    """tag → [(step, value), ...] in the order logged."""
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_metrics(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def metrics_steps(run):
    """tag → the epochs whose metrics.csv row has a value in the tag's column."""
    rows = read_metrics(run)
    columns = {c for r in rows for c, v in r.items() if c != "epoch" and v != ""}
    return {scalar_tag(c): [int(r["epoch"]) for r in rows if r.get(c, "") != ""] for c in columns}


def logged_steps(folder):
    """tag → the steps TensorBoard shows, in order."""
    return {tag: [step for step, _ in values] for tag, values in scalars(read_events(folder)).items()}


def train(data_root, out, epochs, *extra):
    args = ["train", "--data-root", str(data_root), "--noise", "sym50", "--epochs", str(epochs)]
    assert main([*args, "--out-dir", str(out), "--name", "run", *TINY, *extra]) == 0
    return out / "run"


@pytest.fixture(scope="module")
def cifar_root(make_cifar_root):
    return make_cifar_root(200, 60)


def test_an_epoch_logs_its_columns_and_histograms_of_the_seen_samples_whole_and_by_clean_label(tmp_path):
    signals = EpochSignals(6, 3)
    signals.values["alpha"][:] = torch.tensor([0.5, 1.5, float("nan"), 2.0, 0.25, float("nan")])
    signals.values["loss"][:] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # beta and T: never recorded (NaN)
    is_clean = torch.tensor([True, True, True, False, False, False])
    board = TensorBoardLog(tmp_path, first_epoch=1)
    board.log_epoch(
        1, {"epoch": 1, "loss": 0.5, "acc_ensemble": 40.0, "alpha_auroc": math.nan, "meta_acc": 30}, signals, is_clean
    )
    board.close()
    events = read_events(tmp_path)
    assert scalars(events) == {"train/loss": [(1, 0.5)], "test/acc_ensemble": [(1, 40.0)], "meta/meta_acc": [(1, 30.0)]}
    histograms = {tag: events.Histograms(tag)[0].histogram_value for tag in events.Tags()["histograms"]}
    assert sorted(histograms) == sorted(f"signals/{n}{p}" for n in ("alpha", "loss") for p in ("", "_clean", "_noisy"))
    expected = {
        "alpha": [0.5, 1.5, 2.0, 0.25],
        "alpha_clean": [0.5, 1.5],
        "alpha_noisy": [2.0, 0.25],
        "loss": [1, 2, 3, 4, 5, 6],
        "loss_clean": [1, 2, 3],
        "loss_noisy": [4, 5, 6],
    }
    for name, values in expected.items():
        h = histograms[f"signals/{name}"]
        assert (h.num, h.sum, h.min, h.max) == pytest.approx((len(values), sum(values), min(values), max(values))), name


def test_a_folder_that_cannot_be_written_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"cannot write TensorBoard logs to .*file/tb \(Not a directory\); choose"):
        TensorBoardLog(tmp_path / "file" / "tb", first_epoch=1)


def test_scalar_tags_group_the_columns():
    assert [scalar_tag(c) for c in ("loss_ce", "lr", "acc_net1", "test_pred_class_max", "meta_acc")] == [
        "train/loss_ce",
        "train/lr",
        "test/acc_net1",
        "test/test_pred_class_max",
        "meta/meta_acc",
    ]
    assert {scalar_tag(c) for c in ("alpha_auroc", "loss_auroc", "T", "beta", "cdcl_purity", "pseudo_acc")} == {
        f"reliability/{c}" for c in ("alpha_auroc", "loss_auroc", "T", "beta", "cdcl_purity", "pseudo_acc")
    }


@pytest.mark.slow
def test_a_training_run_logs_every_metrics_column_and_the_signal_histograms(cifar_root, tmp_path):
    run = train(cifar_root, tmp_path, 2)
    rows = read_metrics(run)
    logged = scalars(read_events(run / "tb"))
    columns = {c for row in rows for c, v in row.items() if c != "epoch" and v != ""}
    assert {"train/loss_cdcl", "reliability/alpha_auroc", "test/acc_ensemble"} <= set(logged)
    assert set(logged) == {scalar_tag(c) for c in columns}, "one scalar per metrics.csv column, no other"
    for column in columns:
        expected = [(int(row["epoch"]), float(row[column])) for row in rows if row[column] != ""]
        assert [step for step, _ in logged[scalar_tag(column)]] == [step for step, _ in expected], column
        assert [v for _, v in logged[scalar_tag(column)]] == pytest.approx([v for _, v in expected], rel=1e-5), column
    # epoch 2's per-sample signals: the histograms of signals/epoch_0002.npz's finite values
    events = read_events(run / "tb")
    assert sorted(events.Tags()["histograms"]) == sorted(HISTOGRAMS)
    saved = np.load(run / "signals" / "epoch_0002.npz")
    for name in ("alpha", "beta", "T", "loss"):
        for part, keep in (("", True), ("_clean", saved["is_clean"]), ("_noisy", ~saved["is_clean"])):
            values = saved[name][keep & np.isfinite(saved[name])]
            h = events.Histograms(f"signals/{name}{part}")[-1]
            assert h.step == 2
            assert (h.histogram_value.num, h.histogram_value.sum) == pytest.approx(
                (len(values), values.astype(np.float64).sum()), rel=1e-5
            ), name + part


@pytest.mark.slow
def test_a_resumed_run_logs_each_epoch_once_and_hides_what_a_lost_checkpoint_had_logged(cifar_root, tmp_path):
    run = train(cifar_root, tmp_path, 1)
    shutil.copyfile(run / "last.pt", tmp_path / "epoch1.pt")
    train(cifar_root, tmp_path, 2, "--resume")
    assert logged_steps(run / "tb") == metrics_steps(run), "each epoch once, with the columns it has"
    # epoch 2 was logged, then its checkpoint lost (put back epoch 1's): the resumed run trains and logs epoch 2
    # again, and TensorBoard shows that second epoch 2 alone (told apart by its time)
    first_time = dict(scalars(read_events(run / "tb"))["train/epoch_time_s"])[2]
    shutil.copyfile(tmp_path / "epoch1.pt", run / "last.pt")
    train(cifar_root, tmp_path, 2, "--resume")
    assert len(list((run / "tb").iterdir())) == 3, "one event file per process"
    assert logged_steps(run / "tb") == metrics_steps(run)
    times = [float(r["epoch_time_s"]) for r in read_metrics(run)]
    assert times[1] != pytest.approx(first_time, rel=1e-5), "the epoch's two runs took different times"
    assert [v for _, v in scalars(read_events(run / "tb"))["train/epoch_time_s"]] == pytest.approx(times, rel=1e-5)
    assert [h.step for h in read_events(run / "tb").Histograms("signals/alpha")] == [2]


@pytest.mark.slow
def test_a_sweep_logs_its_runs_under_one_root_named_by_their_grid_point(tmp_path, capsys):
    from hrp_ood.sweep import config_changes, load_experiment, print_tensorboard_command, train_run

    config = {
        "dataset": "digits",
        "model": "small_cnn",
        "device": "cpu",
        "meta_size": 50,
        "epochs": 1,
        "batch_size": 256,
        "meta_batch_size": 50,
        "lr_milestones": [],
        "strong_policy": "none",
    }
    path = tmp_path / "experiment.yaml"
    grid = {"noise": ["sym20", "sym50"], "method": ["ce"], "seed": [0]}
    path.write_text(yaml.safe_dump({"config": config, "grid": grid, "out": str(tmp_path / "out")}, sort_keys=False))
    experiment = load_experiment(path)
    names = ["noise-sym20__method-ce__seed-0", "noise-sym50__method-ce__seed-0"]
    assert list(experiment.runs) == names
    for name in names:
        assert train_run(experiment, name)
    root = tmp_path / "out" / "tb"
    assert sorted(p.name for p in root.iterdir()) == names
    for name in names:
        assert [step for step, _ in scalars(read_events(root / name))["test/acc_ensemble"]] == [1]
        assert not (experiment.run_dir(name) / "tb").exists(), "the run logs to the sweep's root only"
    print_tensorboard_command(experiment, training=False)  # nothing to train, logs there: say where
    assert f"tensorboard --logdir {root}" in capsys.readouterr().out
    fresh = load_experiment(path, out=tmp_path / "other")
    print_tensorboard_command(fresh, training=False)  # nothing trains, no logs: say nothing
    assert capsys.readouterr().out == ""
    print_tensorboard_command(fresh, training=True)  # runs about to log
    assert f"tensorboard --logdir {tmp_path / 'other' / 'tb'}" in capsys.readouterr().out
    # a run saved before the sweep placed its TensorBoard logs is still the same run (its logging keys differ)
    saved = experiment.run_dir(names[0]) / "config.yaml"
    values = yaml.safe_load(saved.read_text())
    del values["tensorboard"], values["tensorboard_dir"]
    saved.write_text(yaml.safe_dump(values))
    assert config_changes(experiment, names[0]) == []
    assert train_run(experiment, names[0]) is False  # finished: nothing to resume


@pytest.mark.slow
def test_without_the_tensorboard_package_training_is_unchanged_and_says_so_once(
    cifar_root, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: `import tensorboard` fails
    with caplog.at_level(logging.INFO, logger="hrp_ood"):
        run = train(cifar_root, tmp_path, 2)
    assert [r["epoch"] for r in read_metrics(run)] == ["1", "2"]
    assert not (run / "tb").exists()
    said = [r for r in caplog.records if "tensorboard" in r.getMessage().lower()]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (
            logging.INFO,
            "no TensorBoard logs: the tensorboard package is not installed (pip install 'hrp-ood[tensorboard]')",
        )
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.slow
def test_the_config_key_turns_the_logs_off_and_tensorboard_dir_moves_them(cifar_root, tmp_path):
    run = train(cifar_root, tmp_path / "off", 1, "--set", "tensorboard=false")
    assert not (run / "tb").exists()
    run = train(cifar_root, tmp_path / "moved", 1, "--set", f"tensorboard_dir={tmp_path / 'board'}")
    assert not (run / "tb").exists()
    assert [s for s, _ in scalars(read_events(tmp_path / "board"))["train/loss"]] == [1]
    assert build_config().tensorboard and build_config().tensorboard_dir is None
    # --overwrite replaces the run, its TensorBoard folder included
    run = train(cifar_root, tmp_path / "again", 1)
    before = {p.name for p in (run / "tb").iterdir()}
    run = train(cifar_root, tmp_path / "again", 1, "--overwrite")
    assert len(list((run / "tb").iterdir())) == 1 and not before & {p.name for p in (run / "tb").iterdir()}
