"""End-to-end: `hrp-ood train` on generated data in the real formats, resume, every method, the demo."""

import csv

import pytest
import torch
from conftest import tiny_train_args
from fakes import write_image_folder

from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.config import METHODS
from hrp_ood.data.noise import load_noise

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

TINY = tiny_train_args(hrp=True)


@pytest.fixture(scope="module")
def cifar_root(make_cifar_root):
    return make_cifar_root(200, 60)


def read_metrics(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_train_two_epochs_on_cifar_pickles_then_resume(cifar_root, tmp_path, capsys):
    args = [
        "train",
        "--data-root",
        str(cifar_root),
        "--noise",
        "sym50",
        "--epochs",
        "2",
        "--out-dir",
        str(tmp_path),
        "--name",
        "run",
        *TINY,
    ]
    assert main(args) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "noise.npz", "meta_indices.npz", "metrics.csv", "train.log", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    hrp_row = rows[1]  # epoch 2 is past the warm-up: every HRP term is logged
    for column in (
        "loss_ce",
        "loss_cons",
        "loss_ram",
        "loss_cdcl",
        "loss_prior",
        "alpha",
        "beta",
        "T",
        "gate",
        "alpha_auroc",
        "T_auroc",
        "acc_net1",
        "acc_net2",
        "acc_ensemble",
        "lr",
    ):
        assert column in hrp_row and hrp_row[column] != "", column
    assert 0 <= float(hrp_row["acc_ensemble"]) <= 100
    noisy, clean, _ = load_noise(run / "noise.npz")
    assert 0.3 < (noisy != clean).mean() < 0.6  # sym50 on 10 classes realises ~45%

    before = load_checkpoint(run / "last.pt")
    assert before["epoch"] == 2 and len(before["nets"]) == 2
    assert (
        main(["train", "--out-dir", str(tmp_path), "--name", "run", "--resume", "--epochs", "3", "--no-progress"]) == 0
    )
    after = load_checkpoint(run / "last.pt")
    assert after["epoch"] == 3
    assert [r["epoch"] for r in read_metrics(run)] == ["1", "2", "3"]
    noisy_again, _, _ = load_noise(run / "noise.npz")
    assert (noisy_again == noisy).all(), "resume reuses the saved noise"
    assert "done: 3 epochs" in capsys.readouterr().out


def test_diagnostics_columns_signals_file_and_meta_selected_best(cifar_root, tmp_path):
    args = [
        "train",
        "--data-root",
        str(cifar_root),
        "--noise",
        "sym50",
        "--epochs",
        "3",
        "--out-dir",
        str(tmp_path),
        "--name",
        "diag",
        "--set",
        "signals_every=2",
        "--set",
        "reliability_momentum=0.5",
        *TINY,
    ]
    assert main(args) == 0
    run = tmp_path / "diag"
    warmup, hrp = read_metrics(run)[0], read_metrics(run)[1]
    # warm-up (CE): the loss signal applies, the reliabilities do not and are left empty (never "nan")
    assert warmup["loss_auroc"] != "" and warmup["alpha_auroc"] == "" and warmup["beta_pseudo_auroc"] == ""
    for column in (
        "alpha_auroc",
        "T_auroc",
        "loss_auroc",
        "beta_pseudo_auroc",
        "T_pseudo_auroc",
        "pseudo_acc",
        "targets_S_class_max",
        "ram_lambda_clean_noisy",
        "cdcl_purity",
        "meta_acc",
        "test_pred_class_max",
    ):
        assert hrp[column] != "", column
    assert "nan" not in (run / "metrics.csv").read_text()
    assert sorted(p.name for p in (run / "signals").iterdir()) == ["epoch_0002.npz", "epoch_0003.npz"]
    rows = read_metrics(run)
    best_epoch = max(range(len(rows)), key=lambda i: (float(rows[i]["meta_acc"]), -i)) + 1  # first best on meta
    assert load_checkpoint(run / "best.pt")["epoch"] == best_epoch
    memory = load_checkpoint(run / "last.pt")["reliability_memories"]
    assert len(memory) == 2 and (~torch.isnan(memory[0]["alpha"])).sum() > 0

    assert main(["plot", str(run)]) == 0
    names = {"reliability_auroc", "reliability_hist", "cdcl_purity", "ram_lambda", "gate", "class_hist"}
    assert {p.stem for p in (run / "plots").iterdir()} == names
    assert all((run / "plots" / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_train_on_an_image_folder(tmp_path):
    root = tmp_path / "folder"
    write_image_folder(root, classes=("a", "b", "c"), n_per_class=30, size=32)
    assert (
        main(
            [
                "train",
                "--dataset",
                "folder",
                "--data-root",
                str(root),
                "--noise",
                "sym20",
                "--epochs",
                "2",
                "--out-dir",
                str(tmp_path / "runs"),
                "--name",
                "f",
                "--meta-size",
                "9",
                *TINY[:2],
                "--batch-size",
                "16",
                *TINY[6:],
            ]
        )
        == 0
    )
    state = load_checkpoint(tmp_path / "runs" / "f" / "last.pt")
    assert state["dataset"]["classes"] == ["a", "b", "c"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains(method, cifar_root, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--data-root",
                str(cifar_root),
                "--method",
                method,
                "--epochs",
                "2",
                "--out-dir",
                str(tmp_path),
                "--name",
                method,
                *TINY,
            ]
        )
        == 0
    )
    state = load_checkpoint(tmp_path / method / "last.pt")
    assert len(state["nets"]) == (2 if METHODS[method].dual else 1)
    weights = torch.cat([p.flatten() for p in state["nets"][0].values() if p.is_floating_point()])
    assert torch.isfinite(weights).all()
    held_out = not METHODS[method].trains_on_meta_set
    if not held_out:  # nothing clean held out to select on: best.pt is the last epoch
        assert load_checkpoint(tmp_path / method / "best.pt")["epoch"] == 2
    assert ("selected on the clean meta set" in capsys.readouterr().out) == held_out


def test_existing_run_folder_is_not_overwritten_silently(cifar_root, tmp_path, capsys):
    args = [
        "train",
        "--data-root",
        str(cifar_root),
        "--epochs",
        "1",
        "--out-dir",
        str(tmp_path),
        "--name",
        "r",
        "--method",
        "ce",
        *TINY,
    ]
    assert main(args) == 0
    stamp = (tmp_path / "r" / "last.pt").stat().st_mtime_ns
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "r" / "last.pt").stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--noise", "sym120"], "sym120"),
        (["--noise", "foo40"], "foo40"),
        (["--set", "kappaa=3"], "did you mean 'kappa'"),
        (["--method", "hrpp"], "unknown method"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, words, cifar_root, tmp_path, capsys):
    assert main(["train", "--data-root", str(cifar_root), "--out-dir", str(tmp_path), *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir()), "a rejected run writes nothing"


def test_missing_dataset_names_the_files(tmp_path, capsys):
    assert main(["train", "--data-root", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "runs"), *TINY]) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err


def test_demo_finishes_with_an_ood_table(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path / "demo"), "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "photo_patches" in out and "uniform_noise" in out and "msp" in out
    assert (tmp_path / "demo" / "eval_ensemble" / "eval.json").is_file()
    weights = (tmp_path / "demo" / "last.pt").read_bytes()
    assert main(["demo", "--out-dir", str(tmp_path / "demo"), "--epochs", "1", "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "demo" / "last.pt").read_bytes() == weights  # a second demo deletes nothing unasked


def nan_cross_entropy(monkeypatch):
    original = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: original(*a, **k) * float("nan"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cifar_root, tmp_path, capsys, monkeypatch):
    args = ["train", "--data-root", str(cifar_root), "--method", "ce", "--out-dir", str(tmp_path), "--name", "r", *TINY]
    assert main([*args, "--epochs", "1"]) == 0
    good = (tmp_path / "r" / "last.pt").read_bytes()
    nan_cross_entropy(monkeypatch)
    assert main([*args, "--epochs", "2", "--resume"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("hrp-ood train: error: non-finite loss at epoch 2, step 1 (terms: loss_ce)")
    assert (tmp_path / "r" / "last.pt").read_bytes() == good


def test_non_finite_steps_can_be_skipped_and_counted(cifar_root, tmp_path, monkeypatch):
    args = ["train", "--data-root", str(cifar_root), "--method", "ce", "--out-dir", str(tmp_path), "--name", "r", *TINY]
    assert main([*args, "--epochs", "1"]) == 0
    before = load_checkpoint(tmp_path / "r" / "last.pt")["nets"][0]
    nan_cross_entropy(monkeypatch)
    assert main([*args, "--epochs", "2", "--resume", "--set", "on_nonfinite=skip"]) == 0
    rows = read_metrics(tmp_path / "r")
    steps = (200 - 20) // 32
    assert rows[1]["skipped_steps"] == str(steps)
    after = load_checkpoint(tmp_path / "r" / "last.pt")["nets"][0]
    assert all(
        torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point() and "running" not in k
    ), "a skipped step leaves the weights alone"


def test_compile_and_channels_last_are_opt_in(cifar_root, tmp_path, monkeypatch):
    compiled = []

    def fake_compile(module):  # torch.compile itself needs minutes of CPU; check the wiring only
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert (
        main(
            [
                "train",
                "--data-root",
                str(cifar_root),
                "--epochs",
                "1",
                "--out-dir",
                str(tmp_path),
                "--name",
                "c",
                *TINY,
                "--set",
                "compile=true",
                "--set",
                "channels_last=true",
            ]
        )
        == 0
    )
    assert len(compiled) == 2, "both networks' training passes are compiled"
    conv_weights = [p for m in compiled for p in m.parameters() if p.dim() == 4]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    state = load_checkpoint(tmp_path / "c" / "last.pt")
    assert state["config"]["compile"] and state["config"]["channels_last"]
    assert not any(k.startswith("_orig_mod") for k in state["nets"][0]), "checkpoints hold the plain network"


def test_single_network_baseline_trains_on_the_whole_training_split(cifar_root, tmp_path, capsys):
    from hrp_ood.data.meta_set import load_indices

    args = ["train", "--data-root", str(cifar_root), "--epochs", "1", "--out-dir", str(tmp_path), *TINY]
    assert main([*args, "--name", "ce0", "--method", "ce", "--meta-size", "0"]) == 0
    split = load_indices(tmp_path / "ce0" / "meta_indices.npz")
    assert split["meta_indices"].size == 0 and split["train_indices"].tolist() == list(range(200))
    capsys.readouterr()
    assert main([*args, "--name", "hrp0", "--method", "hrp", "--meta-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "meta_size must be positive for hrp" in err
    assert not (tmp_path / "hrp0").exists()
    assert main([*args, "--name", "cm0", "--method", "ce_meta", "--meta-size", "0"]) == 2
    assert "meta_size must be positive for ce_meta" in capsys.readouterr().err


def test_without_a_meta_set_best_pt_is_the_last_epoch(cifar_root, tmp_path, capsys, monkeypatch):
    from hrp_ood.train import trainer

    test_accuracy = iter([90.0, 50.0, 10.0])  # the test accuracy falls every epoch: the test set's best is epoch 1

    def falling(predictions, labels, prefix="acc"):
        row = real(predictions, labels, prefix)
        row[f"{prefix}_ensemble"] = next(test_accuracy)
        return row

    real = trainer.accuracies
    monkeypatch.setattr(trainer, "accuracies", falling)
    args = ["train", "--data-root", str(cifar_root), "--epochs", "3", "--out-dir", str(tmp_path), *TINY]
    assert main([*args, "--name", "ce0", "--method", "ce", "--meta-size", "0"]) == 0
    out = capsys.readouterr().out
    assert "10.00% (best.pt, the last epoch: no clean meta set (meta_size 0), and never selected on the test" in out
    assert load_checkpoint(tmp_path / "ce0" / "best.pt")["epoch"] == 3
    with (tmp_path / "ce0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["acc_ensemble"] for row in rows] == ["90", "50", "10"]
    assert [row["meta_acc"] for row in rows] == ["", "", ""]  # no test accuracy under the meta set's name
