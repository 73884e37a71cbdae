"""Issue 4: bad input gets a clear error. Every row runs the real CLI (`hrp_ood.cli.main`, in-process) on
generated data in the real formats and checks the contract of a rejected command:

* exit code 2, and stderr is exactly one line "hrp-ood <command>: error: ..." with no traceback;
* the line names what is wrong and how to fix it (the row's key words);
* nothing already on disk is touched: every file keeps its bytes and mtime (the files of the existing
  run folders are hashed), and no file or folder is left behind by the rejected command.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_args
from fakes import write_animal10n, write_cifar10, write_cifar100, write_image_folder

from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.errors import UserError
from hrp_ood.models import create_model

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

TINY = [*tiny_train_args(), "--epochs", "1"]
CIFAR10_TRAIN = 100


class RunsCode:
    """A pickle payload that would create `marker` if it were ever unpickled by a code-running loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Workspace:
    root: Path

    def path(self, relative: str) -> Path:
        return self.root / relative

    def train(self, *extra: str, data: str = "cifar10") -> list[str]:
        return [
            "train",
            "--data-root",
            str(self.path(data)),
            "--out-dir",
            str(self.path("runs")),
            "--name",
            "rejected",
            *TINY,
            *extra,
        ]

    def evaluate(self, ckpt: str, *extra: str, ood: str = "clean_ood") -> list[str]:
        return [
            "evaluate",
            "--ckpt",
            str(self.path(ckpt)),
            "--postprocessor",
            "msp",
            "--device",
            "cpu",
            "--ood-dir",
            f"mine={self.path(ood)}",
            "--ood",
            "mine",
            "--out",
            str(self.path("eval_out")),
            "--cache-dir",
            str(self.path("cache")),
            *extra,
        ]


def _write_label_files(ws: Workspace) -> None:
    folder = ws.path("labels")
    folder.mkdir()
    np.save(folder / "short.npy", np.zeros(7, dtype=np.int64))
    np.save(folder / "out_of_range.npy", np.full(CIFAR10_TRAIN, 12, dtype=np.int64))
    np.save(folder / "floats.npy", np.zeros(CIFAR10_TRAIN, dtype=np.float32))
    torch.save({"worse_label": np.zeros(CIFAR10_TRAIN, dtype=np.int64)}, folder / "cifar10n.pt")
    (folder / "random.pt").write_bytes(np.random.default_rng(2).bytes(4096))


def _write_configs(ws: Workspace) -> None:
    folder = ws.path("configs")
    folder.mkdir()
    (folder / "unknown_key.yaml").write_text("kapa: 2.0\n")
    (folder / "wrong_type.yaml").write_text("kappa: high\n")
    (folder / "invalid.yaml").write_text("lr: 0.1\nlr_milestones: [1, 2\n")
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{chr(98 + k)}: &{chr(98 + k)} [*{chr(97 + k)},*{chr(97 + k)},*{chr(97 + k)},*{chr(97 + k)}]\n"
        for k in range(8)
    )
    (folder / "alias_bomb.yaml").write_text(bomb)  # 4^8 x 9 strings once expanded
    (folder / "deep.yaml").write_text("lr: " + "[" * 50 + "]" * 50 + "\n")
    (folder / "huge_grid.yaml").write_text(
        "grid:\n" + "".join(f"  {key}: {list(range(40))}\n" for key in ("seed", "lr", "epochs", "kappa", "gamma"))
    )
    (folder / "binary.yaml").write_bytes(np.random.default_rng(1).bytes(256) + b"\x00")
    (folder / "latin1.yaml").write_bytes("# caf\u00e9\nlr: 0.1\n".encode("latin-1"))


def _write_output_obstacles(ws: Workspace) -> None:
    """A file where a folder is expected, a folder of the user's beside the runs, a run folder holding other files."""
    ws.path("afile").write_text("not a folder")
    ws.path("outside").mkdir()
    ws.path("outside/thesis.tex").write_text("years of work")
    ws.path("runs/foreign").mkdir()
    ws.path("runs/foreign/notes.txt").write_text("my notes")
    latin1_list = ws.path("openood_latin1/benchmark_imglist/cifar10/test_svhn.txt")
    latin1_list.parent.mkdir(parents=True)
    ws.path("openood_latin1/images_classic").mkdir()
    latin1_list.write_bytes("svhn/caf\u00e9.png 0\n".encode("latin-1"))


def _write_data(ws: Workspace) -> None:
    write_cifar10(ws.path("cifar10"), n_train=CIFAR10_TRAIN, n_test=30, seed=0)
    write_cifar100(ws.path("cifar100"), n_train=200, n_test=50, seed=1)
    write_image_folder(ws.path("folder"))
    write_cifar100(ws.path("cifar100_partial"), n_train=100, n_test=20, seed=2)
    for name in ("test", "meta"):
        (ws.path("cifar100_partial/cifar-100-python") / name).unlink()
    write_animal10n(ws.path("animal10n_no_test"), n_train=10, n_test=5)
    shutil.rmtree(ws.path("animal10n_no_test/testing"))
    ws.path("empty_root").mkdir()
    write_image_folder(ws.path("clean_ood"), splits=("x",), n_per_class=4, seed=3)
    write_image_folder(ws.path("corrupt_ood"), splits=("x",), n_per_class=4, seed=4)
    (ws.path("corrupt_ood/x/a") / "bad.png").write_bytes(b"\x89PNG but not really an image")
    ws.path("empty_ood").mkdir()
    image_list = ws.path("openood/benchmark_imglist/cifar10/test_svhn.txt")
    image_list.parent.mkdir(parents=True)
    ws.path("openood/images_classic").mkdir()
    image_list.write_text("svhn/0.png 0\nsvhn/1.png 0\n")


def _write_checkpoints(ws: Workspace) -> None:
    folder = ws.path("ckpts")
    folder.mkdir()
    real = ws.path("runs/existing/last.pt")
    data = real.read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    (folder / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 1}, folder / "plain_dict.pt")
    marker = ws.path("PWNED")
    torch.save({"format": "hrp-ood/1", "nets": RunsCode(marker)}, folder / "runs_code.pt")
    with (folder / "runs_code.pkl").open("wb") as f:
        pickle.dump({"format": "hrp-ood/1", "nets": RunsCode(marker)}, f, protocol=2)

    state = load_checkpoint(real)
    other_backbone = create_model("preact_resnet18", num_classes=10).state_dict()
    torch.save({**state, "nets": [other_backbone, other_backbone]}, folder / "other_backbone.pt")
    five_classes = [{**net, "fc.weight": net["fc.weight"][:5], "fc.bias": net["fc.bias"][:5]} for net in state["nets"]]
    torch.save({**state, "nets": five_classes}, folder / "other_class_count.pt")
    ws.path("corrupt_eval.json").write_text('{"method": "hrp", "results": [')


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("bad_input"))
    _write_data(ws)
    runs = str(ws.path("runs"))
    assert (
        main(
            [
                "train",
                "--data-root",
                str(ws.path("cifar10")),
                "--out-dir",
                runs,
                "--name",
                "existing",
                "--noise",
                "sym50",
                *TINY,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--dataset",
                "cifar100",
                "--data-root",
                str(ws.path("cifar100")),
                "--out-dir",
                runs,
                "--name",
                "c100",
                "--method",
                "ce",
                "--noise",
                "sym20",
                *TINY,
                "--meta-size",
                "100",
            ]
        )
        == 0
    )
    _write_label_files(ws)
    _write_configs(ws)
    _write_checkpoints(ws)
    _write_output_obstacles(ws)
    return ws


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: folders by name; files by size and mtime, plus a hash inside the run folders.

    A run folder's lock file is left out: it records which process holds the folder, so every command that
    takes the lock rewrites it (with the same pid, in-process).
    """
    state = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.name == ".lock":
            continue
        if path.is_dir():
            state[relative] = ("dir",)
            continue
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if relative.startswith("runs/") else ""
        state[relative] = (stat.st_size, stat.st_mtime_ns, digest)
    return state


# (id, command, argv(ws), key words the one-line message must contain)
ROWS = [
    # ---- noise specs and label files
    ("noise-rate-above-100", "train", lambda ws: ws.train("--noise", "sym120"), ["120", "above 100", "sym80"]),
    ("noise-negative-rate", "train", lambda ws: ws.train("--noise", "sym-5"), ["'sym-5'", "valid forms", "symR"]),
    ("noise-unknown-mode", "train", lambda ws: ws.train("--noise", "foo40"), ["'foo40'", "valid forms", "asymR"]),
    (
        "noise-asym-without-class-map",
        "train",
        lambda ws: ws.train("--dataset", "folder", "--noise", "asym40", data="folder"),
        ["asymmetric noise", "'folder'", "symR"],
    ),
    (
        "labels-wrong-length",
        "train",
        lambda ws: ws.train("--noisy-labels", str(ws.path("labels/short.npy"))),
        ["short.npy", "7 labels", f"has {CIFAR10_TRAIN}"],
    ),
    (
        "labels-out-of-range",
        "train",
        lambda ws: ws.train("--noisy-labels", str(ws.path("labels/out_of_range.npy"))),
        ["out_of_range.npy", "[12, 12]", "10 classes [0, 9]"],
    ),
    (
        "labels-float-dtype",
        "train",
        lambda ws: ws.train("--noisy-labels", str(ws.path("labels/floats.npy"))),
        ["floats.npy", "must be integers", "float32"],
    ),
    (
        "labels-pt-without-key",
        "train",
        lambda ws: ws.train("--noisy-labels", str(ws.path("labels/cifar10n.pt")), "--noisy-labels-key", "aggre_label"),
        ["cifar10n.pt", "no key 'aggre_label'", "choose one of: worse_label"],
    ),
    # ---- configs
    (
        "config-unknown-key",
        "train",
        lambda ws: ws.train("--config", str(ws.path("configs/unknown_key.yaml"))),
        ["unknown config key 'kapa'", "unknown_key.yaml", "did you mean 'kappa'"],
    ),
    (
        "set-unknown-key",
        "train",
        lambda ws: ws.train("--set", "kapa=2"),
        ["unknown config key 'kapa'", "did you mean 'kappa'"],
    ),
    (
        "config-wrong-type",
        "train",
        lambda ws: ws.train("--config", str(ws.path("configs/wrong_type.yaml"))),
        ["'kappa'", "must be float", "'high'"],
    ),
    (
        "config-missing-file",
        "train",
        lambda ws: ws.train("--config", str(ws.path("configs/missing.yaml"))),
        ["missing.yaml", "not found", "configs/"],
    ),
    (
        "config-invalid-yaml",
        "train",
        lambda ws: ws.train("--config", str(ws.path("configs/invalid.yaml"))),
        ["invalid.yaml", "not valid YAML", "line"],
    ),
    (
        "config-yaml-alias-bomb",
        "train",
        lambda ws: ws.train("--config", str(ws.path("configs/alias_bomb.yaml"))),
        ["alias_bomb.yaml", "YAML aliases (*name) are not supported (line 2)"],
    ),
    (
        "config-yaml-too-deep",
        "train",
        lambda ws: ws.train("--config", str(ws.path("configs/deep.yaml"))),
        ["deep.yaml", "nested deeper than 20 levels"],
    ),
    (
        "experiment-grid-too-large",
        "sweep",
        lambda ws: ["sweep", str(ws.path("configs/huge_grid.yaml"))],
        ["the grid has 102,400,000 points, over 10,000", "split it"],
    ),
    # ---- data
    (
        "cifar10-missing",
        "train",
        lambda ws: ws.train(data="empty_root"),
        ["cifar10 not found", "cifar-10-batches-py", "data_batch_1", "cifar-10-python.tar.gz", "--download"],
    ),
    (
        "cifar100-files-missing",
        "train",
        lambda ws: ws.train("--dataset", "cifar100", data="cifar100_partial"),
        ["cifar-100-python", "missing: test, meta", "--download"],
    ),
    (
        "image-folder-missing",
        "train",
        lambda ws: ws.train("--dataset", "folder", data="empty_root"),
        ["not found", "empty_root/train", "--data-root"],
    ),
    (
        "animal10n-test-split-missing",
        "train",
        lambda ws: ws.train("--dataset", "animal10n", data="animal10n_no_test"),
        ["Animal-10N test split not found", "animal10n_no_test/testing", "<label>_<id>.jpg", "--data-root"],
    ),
    (
        "ood-image-list-missing-images",
        "evaluate",
        lambda ws: [
            "evaluate",
            "--ckpt",
            str(ws.path("runs/existing/last.pt")),
            "--postprocessor",
            "msp",
            "--data-root",
            str(ws.path("openood")),
            "--ood",
            "svhn",
            "--out",
            str(ws.path("eval_out")),
            "--cache-dir",
            str(ws.path("cache")),
        ],
        ["test_svhn.txt", "2 image(s) missing", "images_classic", "--data-root"],
    ),
    (
        "ood-corrupt-image",
        "evaluate",
        lambda ws: ws.evaluate("runs/existing/last.pt", ood="corrupt_ood"),
        ["cannot decode image", "bad.png", "--skip-corrupt"],
    ),
    (
        "ood-empty-set",
        "evaluate",
        lambda ws: ws.evaluate("runs/existing/last.pt", ood="empty_ood"),
        ["'mine'", "empty_ood", "holds no images", "--ood-dir"],
    ),
    # ---- checkpoints
    (
        "ood-set-named-id",
        "evaluate",
        lambda ws: ws.evaluate("runs/existing/last.pt", "--ood-dir", f"id={ws.path('clean_ood')}"),
        ["--ood-dir: OOD set name 'id' is reserved", "give the set another name"],
    ),
    (
        "ood-set-named-mean",
        "evaluate",
        lambda ws: ws.evaluate("runs/existing/last.pt", "--ood-dir", f"Mean={ws.path('clean_ood')}"),
        ["OOD set name 'Mean' is reserved"],
    ),
    (
        "export-over-its-checkpoint",
        "export",
        lambda ws: [
            "export",
            "--ckpt",
            str(ws.path("runs/existing/last.pt")),
            "--out",
            str(ws.path("runs/existing/last.pt")),
        ],
        ["is the checkpoint being exported", "write the export elsewhere"],
    ),
    (
        "export-over-a-run-file",
        "export",
        lambda ws: [
            "export",
            "--ckpt",
            str(ws.path("runs/existing/last.pt")),
            "--out",
            str(ws.path("runs/existing/best.pt")),
        ],
        ["is a file of a run folder"],
    ),
    ("ckpt-missing", "evaluate", lambda ws: ws.evaluate("ckpts/nope.pt"), ["nope.pt", "not found", "last.pt"]),
    (
        "ckpt-truncated",
        "evaluate",
        lambda ws: ws.evaluate("ckpts/truncated.pt"),
        ["truncated.pt", "truncated or not a torch checkpoint", "retrain"],
    ),
    (
        "ckpt-random-bytes",
        "evaluate",
        lambda ws: ws.evaluate("ckpts/random.pt"),
        ["random.pt", "not a torch checkpoint"],
    ),
    (
        "ckpt-plain-torch-dict",
        "evaluate",
        lambda ws: ws.evaluate("ckpts/plain_dict.pt"),
        ["plain_dict.pt", "not an hrp-ood checkpoint", "hrp-ood train"],
    ),
    (
        "ckpt-pickle-runs-code",
        "evaluate",
        lambda ws: ws.evaluate("ckpts/runs_code.pt"),
        ["refusing to load", "runs_code.pt", "system", "could run code"],
    ),
    (
        "ckpt-raw-pickle-runs-code",
        "evaluate",
        lambda ws: ws.evaluate("ckpts/runs_code.pkl"),
        ["refusing to load", "runs_code.pkl", "could run code"],
    ),
    (
        "ckpt-other-backbone",
        "evaluate",
        lambda ws: ws.evaluate("ckpts/other_backbone.pt"),
        ["other_backbone.pt", "small_cnn", "another backbone"],
    ),
    (
        "ckpt-other-class-count",
        "evaluate",
        lambda ws: ws.evaluate("ckpts/other_class_count.pt"),
        ["other_class_count.pt", "10 classes", "another class count", "fc has 5 outputs"],
    ),
    (
        "ckpt-cifar100-with-cifar10-id-files",
        "evaluate",
        lambda ws: ws.evaluate("runs/c100/last.pt", "--id-data-root", str(ws.path("cifar10"))),
        ["trained on cifar100", "cifar-100-python", "--id-data-root"],
    ),
    # ---- command line
    (
        "unknown-postprocessor",
        "evaluate",
        lambda ws: [*ws.evaluate("runs/existing/last.pt"), "--postprocessor", "foo"],
        ["unknown postprocessor foo", "msp", "ebo", "mds"],
    ),
    (
        "unknown-ood-set",
        "evaluate",
        lambda ws: [*ws.evaluate("runs/existing/last.pt"), "--ood", "foo"],
        ["unknown OOD set foo", "svhn", "textures", "mnist", "--ood-dir NAME=PATH"],
    ),
    (
        "ood-dir-without-equals",
        "evaluate",
        lambda ws: [*ws.evaluate("runs/existing/last.pt"), "--ood-dir", str(ws.path("clean_ood"))],
        ["--ood-dir expects NAME=PATH", "clean_ood"],
    ),
    (
        "report-missing-eval-json",
        "report",
        lambda ws: ["report", str(ws.path("nope/eval.json")), "--out", str(ws.path("report_out"))],
        ["nope/eval.json", "no such file"],
    ),
    (
        "report-corrupt-eval-json",
        "report",
        lambda ws: ["report", str(ws.path("corrupt_eval.json")), "--out", str(ws.path("report_out"))],
        ["corrupt_eval.json", "not a readable JSON", "hrp-ood evaluate"],
    ),
    (
        "export-missing-checkpoint",
        "export",
        lambda ws: ["export", "--ckpt", str(ws.path("ckpts/nope.pt")), "--out", str(ws.path("exported.pt"))],
        ["nope.pt", "not found"],
    ),
    # ---- the run folder never reaches outside --out-dir, and --overwrite removes only a run of ours
    (
        "run-name-climbs-out-of-out-dir",
        "train",
        lambda ws: ws.train("--name", "../outside", "--overwrite"),
        ["run name ../outside must be one folder name", "--out-dir"],
    ),
    (
        "run-name-is-an-absolute-path",
        "train",
        lambda ws: ws.train("--name", str(ws.path("outside")), "--overwrite"),
        ["run name /", "outside must be one folder name"],
    ),
    (
        "overwrite-folder-holding-other-files",
        "train",
        lambda ws: ws.train("--name", "foreign", "--overwrite"),
        ["runs/foreign holds files that are not part of an hrp-ood run (notes.txt)", "another --name"],
    ),
    (
        "start-in-folder-holding-other-files",
        "train",
        lambda ws: ws.train("--name", "foreign"),
        ["runs/foreign holds files that are not part of an hrp-ood run (notes.txt)"],
    ),
    (
        "overwrite-with-missing-data-keeps-the-old-run",
        "train",
        lambda ws: ws.train("--name", "existing", "--overwrite", data="empty_root"),
        ["cifar10 not found"],
    ),
    # ---- every config value checked before anything is written
    ("lr-not-a-number", "train", lambda ws: ws.train("--lr", "nan"), ["lr must be a finite number > 0, got nan"]),
    (
        "lr-negative",
        "train",
        lambda ws: ws.train("--lr", "-0.1"),
        ["lr must be a finite number > 0, got -0.1", "--set lr="],
    ),
    (
        "momentum-above-1",
        "train",
        lambda ws: ws.train("--set", "momentum=1.5"),
        ["momentum must be a finite number in [0, 1), got 1.5"],
    ),
    (
        "weight-decay-negative",
        "train",
        lambda ws: ws.train("--set", "weight_decay=-0.0001"),
        ["weight_decay must be a finite number >= 0, got -0.0001"],
    ),
    (
        "weight-decay-infinite",
        "train",
        lambda ws: ws.train("--set", "weight_decay=.inf"),
        ["weight_decay must be a finite number >= 0, got inf"],
    ),
    ("kappa-negative", "train", lambda ws: ws.train("--set", "kappa=-4"), ["kappa must be a finite number > 0"]),
    ("t-min-zero", "train", lambda ws: ws.train("--set", "t_min=0"), ["t_min must be a finite number > 0"]),
    (
        "t-min-above-t-max",
        "train",
        lambda ws: ws.train("--set", "t_min=5"),
        ["t_min (5.0) must not exceed t_max (3.0)"],
    ),
    (
        "tau-conf-above-1",
        "train",
        lambda ws: ws.train("--set", "tau_conf=1.5"),
        ["tau_conf must be a finite number in [0, 1], got 1.5"],
    ),
    (
        "gamma-negative",
        "train",
        lambda ws: ws.train("--set", "gamma=-0.5"),
        ["gamma must be a finite number in [0, 1]"],
    ),
    ("gce-q-zero", "train", lambda ws: ws.train("--set", "gce_q=0"), ["gce_q must be a finite number in (0, 1]"]),
    (
        "forget-rate-one",
        "train",
        lambda ws: ws.train("--set", "forget_rate=1"),
        ["forget_rate must be a finite number in [0, 1)"],
    ),
    (
        "batch-size-zero",
        "train",
        lambda ws: ws.train("--batch-size", "0"),
        ["batch_size must be an integer >= 1, got 0"],
    ),
    ("proj-dim-zero", "train", lambda ws: ws.train("--set", "proj_dim=0"), ["proj_dim must be an integer >= 1"]),
    (
        "warmup-negative",
        "train",
        lambda ws: ws.train("--set", "warmup_epochs=-1"),
        ["warmup_epochs must be an integer >= 0"],
    ),
    (
        "image-size-zero",
        "train",
        lambda ws: ws.train("--set", "image_size=0"),
        ["image_size must be an integer in [1, 4096], got 0"],
    ),
    (
        "seed-negative",
        "train",
        lambda ws: ws.train("--seed", "-1"),
        ["seed must be an integer in [0, 4294967295], got -1"],
    ),
    ("seed-beyond-numpy", "train", lambda ws: ws.train("--seed", str(2**32)), ["seed must be", "got 4294967296"]),
    (
        "epochs-absurd",
        "train",
        lambda ws: ws.train("--epochs", "1000000000"),
        ["epochs must be an integer in [1, 100000], got 1000000000"],
    ),
    (
        "milestones-beyond-epochs",
        "train",
        lambda ws: ws.train("--epochs", "2", "--set", "lr_milestones=[1, 5]"),
        ["lr_milestones [1, 5] lie outside [0, 2]", "never decay at 5", "or [] for a constant rate"],
    ),
    (
        "milestone-negative",
        "train",
        lambda ws: ws.train("--set", "lr_milestones=[-1]"),
        ["lr_milestones [-1] lie outside [0, 1]"],
    ),
    (
        "device-unknown",
        "train",
        lambda ws: ws.train("--device", "gpu"),
        ["device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"],
    ),
    (
        "labels-key-without-label-file",
        "train",
        lambda ws: ws.train("--noisy-labels-key", "worse_label"),
        ["noisy_labels_key 'worse_label' is set but noisy_labels is not", "--noisy-labels FILE"],
    ),
    (
        "meta-set-smaller-than-class-count",
        "train",
        lambda ws: ws.train("--meta-size", "5"),
        ["meta_size 5 is smaller than the 10 classes of cifar10", "--meta-size 10"],
    ),
    (
        "meta-set-smaller-than-class-count-no-meta-step",
        "train",
        lambda ws: ws.train("--method", "ce", "--meta-size", "5"),
        ["meta_size 5 is smaller than the 10 classes of cifar10", "--meta-size 10 or more, or --meta-size 0"],
    ),
    (
        "meta-size-zero-with-a-meta-step",
        "train",
        lambda ws: ws.train("--method", "hrp", "--meta-size", "0"),
        ["meta_size must be positive for hrp", "meta_size 0 is for methods without one: ce, gce, coteach"],
    ),
    (
        "batch-larger-than-training-set",
        "train",
        lambda ws: ws.train("--batch-size", "500"),
        ["batch_size 500 exceeds the 80 training images left after the 20-image meta set", "--batch-size"],
    ),
    # ---- text files in other encodings or binary, torch's advice never repeated
    (
        "config-binary",
        "train",
        lambda ws: ws.train("--config", str(ws.path("configs/binary.yaml"))),
        ["config file", "binary.yaml is a binary file", "UTF-8"],
    ),
    (
        "config-latin1",
        "train",
        lambda ws: ws.train("--config", str(ws.path("configs/latin1.yaml"))),
        ["config file", "latin1.yaml is not UTF-8 text (byte 0xe9 at offset 5)", "save it as UTF-8"],
    ),
    (
        "image-list-latin1",
        "evaluate",
        lambda ws: [
            "evaluate",
            "--ckpt",
            str(ws.path("runs/existing/last.pt")),
            "--postprocessor",
            "msp",
            "--data-root",
            str(ws.path("openood_latin1")),
            "--ood",
            "svhn",
            "--out",
            str(ws.path("eval_out")),
            "--cache-dir",
            str(ws.path("cache")),
        ],
        ["image list", "test_svhn.txt is not UTF-8 text", "save it as UTF-8"],
    ),
    (
        "labels-pt-random-bytes",
        "train",
        lambda ws: ws.train("--noisy-labels", str(ws.path("labels/random.pt"))),
        ["label file", "random.pt is truncated or not a torch label file"],
    ),
    # ---- output paths that cannot be written are refused before any work
    (
        "train-out-dir-is-a-file",
        "train",
        lambda ws: ws.train("--out-dir", str(ws.path("afile"))),
        ["--out-dir", "afile is a file, not a folder"],
    ),
    (
        "train-out-dir-below-a-file",
        "train",
        lambda ws: ws.train("--out-dir", str(ws.path("afile/runs"))),
        ["--out-dir", "afile/runs:", "afile is a file, not a folder"],
    ),
    (
        "evaluate-out-is-a-file",
        "evaluate",
        lambda ws: [*ws.evaluate("runs/existing/last.pt"), "--out", str(ws.path("afile"))],
        ["--out", "afile is a file"],
    ),
    (
        "evaluate-cache-dir-is-a-file",
        "evaluate",
        lambda ws: [*ws.evaluate("runs/existing/last.pt"), "--cache-dir", str(ws.path("afile/cache"))],
        ["--cache-dir", "afile is a file"],
    ),
    (
        "ood-dir-missing-with-skip-missing",
        "evaluate",
        lambda ws: [*ws.evaluate("runs/existing/last.pt", ood="no_such_folder"), "--skip-missing"],
        ["--ood-dir mine=", "no_such_folder: no such folder", "mine images"],
    ),
    (
        "evaluate-batch-size-zero",
        "evaluate",
        lambda ws: [*ws.evaluate("runs/existing/last.pt"), "--batch-size", "0"],
        ["--batch-size must be at least 1, got 0"],
    ),
    (
        "evaluate-device-unknown",
        "evaluate",
        lambda ws: [*ws.evaluate("runs/existing/last.pt"), "--device", "gpu"],
        ["device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"],
    ),
    (
        "report-out-is-a-file",
        "report",
        lambda ws: ["report", str(ws.path("corrupt_eval.json")), "--out", str(ws.path("afile"))],
        ["--out", "afile is a file"],
    ),
    (
        "export-out-is-a-folder",
        "export",
        lambda ws: ["export", "--ckpt", str(ws.path("runs/existing/last.pt")), "--out", str(ws.path("configs"))],
        ["--out", "configs is a folder; give the path of a file"],
    ),
    (
        "export-out-below-a-file",
        "export",
        lambda ws: ["export", "--ckpt", str(ws.path("runs/existing/last.pt")), "--out", str(ws.path("afile/net.pt"))],
        ["--out", "afile/net.pt: ", "afile is a file, not a folder"],
    ),
    # ---- paths in messages show what is really in them
    (
        "ckpt-path-with-a-bom",
        "evaluate",
        lambda ws: ws.evaluate("ckpts/\ufeffnope.pt"),
        ["checkpoint '", "ckpts/\\ufeffnope.pt' not found"],
    ),
    (
        "ckpt-path-with-a-trailing-space",
        "evaluate",
        lambda ws: ws.evaluate("ckpts/nope.pt "),
        ["checkpoint '", "ckpts/nope.pt ' not found"],
    ),
    (
        "config-path-with-a-zero-width-space",
        "train",
        lambda ws: ws.train("--config", str(ws.path("configs/\u200bmissing.yaml"))),
        ["config file '", "configs/\\u200bmissing.yaml' not found"],
    ),
]
PARAMS = [pytest.param(*row, id=row[0]) for row in ROWS]


@pytest.mark.parametrize(("case", "command", "argv", "words"), PARAMS)
def test_bad_input_is_one_clear_line_and_damages_nothing(case, command, argv, words, ws, capsys):
    args = argv(ws)
    before = snapshot(ws.root)
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (case, err)
    assert len(lines) == 1, f"{case}: stderr is not one line:\n{err}"
    assert lines[0].startswith(f"hrp-ood {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{case}: {word!r} missing from: {lines[0]}"
    assert "Traceback" not in out + err
    assert "weights_only" not in err and "can still be loaded" not in err, "torch's unsafe advice is never repeated"
    assert snapshot(ws.root) == before, f"{case}: the rejected command changed files on disk"
    assert not ws.path("PWNED").exists(), "a crafted pickle ran code"


def test_skip_corrupt_succeeds_and_logs_how_many_images_it_skipped(ws, tmp_path, capsys):
    before = snapshot(ws.root)
    args = ws.evaluate("runs/existing/last.pt", "--skip-corrupt", ood="corrupt_ood")
    args[args.index("--out") + 1] = str(tmp_path / "eval")
    args[args.index("--cache-dir") + 1] = str(tmp_path / "cache")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "bad.png" in err
    assert "OOD set mine: 12 images" in err  # 3 classes × 4 good images; the corrupt one is not counted
    assert (tmp_path / "eval" / "eval.json").is_file()
    assert snapshot(ws.root) == before


def test_debug_reraises_the_error_with_its_traceback(ws, capsys):
    with pytest.raises(UserError, match="nope.pt not found"):
        main(["--debug", *ws.evaluate("ckpts/nope.pt")])
    assert capsys.readouterr().err == "", "with --debug the error propagates instead of being printed"


def read_only(monkeypatch, folder: Path) -> None:
    """Make `folder` read-only for this process, as the kernel would: creating or writing anything under it fails
    with EACCES (the tests may run as root, whom chmod does not stop)."""
    real_open, real_mkdir = os.open, os.mkdir
    inside = str(folder)

    def refuse(path) -> bool:
        return os.fspath(path) == inside or os.fspath(path).startswith(inside + os.sep)

    def guarded_open(path, flags, *args, **kwargs):
        if refuse(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if refuse(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


@pytest.mark.parametrize(
    "command, argv",
    [
        ("train", lambda ws, ro: ws.train("--out-dir", str(ro / "runs"))),
        ("evaluate", lambda ws, ro: [*ws.evaluate("runs/existing/last.pt"), "--out", str(ro / "eval")]),
        ("evaluate", lambda ws, ro: [*ws.evaluate("runs/existing/last.pt"), "--cache-dir", str(ro / "cache")]),
        ("report", lambda ws, ro: ["report", str(ws.path("corrupt_eval.json")), "--out", str(ro / "report")]),
        (
            "export",
            lambda ws, ro: ["export", "--ckpt", str(ws.path("runs/existing/last.pt")), "--out", str(ro / "n.pt")],
        ),
    ],
    ids=["train-out-dir", "evaluate-out", "evaluate-cache-dir", "report-out", "export-out"],
)
def test_a_read_only_output_folder_is_one_line_naming_it_before_any_work(
    command, argv, ws, tmp_path, monkeypatch, capsys
):
    read_only_folder = tmp_path / "read_only"
    read_only_folder.mkdir()
    args = argv(ws, read_only_folder)
    before = snapshot(ws.root)
    read_only(monkeypatch, read_only_folder)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hrp-ood {command}: error: "), err
    assert f"cannot write in {read_only_folder} (Permission denied (EACCES))" in err
    monkeypatch.undo()
    assert list(read_only_folder.iterdir()) == [] and snapshot(ws.root) == before


def test_a_full_disk_while_training_is_one_line_and_keeps_the_last_checkpoint(ws, tmp_path, monkeypatch, capsys):
    shutil.copytree(ws.path("runs/existing"), tmp_path / "existing")
    run = tmp_path / "existing"
    before = {
        p.name: p.read_bytes()
        for p in run.iterdir()
        if p.is_file() and p.name not in (".lock", "train.log", "config.yaml")
    }
    signals_before = sorted(p.name for p in (run / "signals").iterdir())

    fsync = os.fsync

    def full_disk_for_checkpoints(fd):  # the disk fills up while epoch 2's checkpoint is written
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_for_checkpoints)
    capsys.readouterr()
    assert (
        main(["train", "--out-dir", str(tmp_path), "--name", "existing", "--resume", "--epochs", "2", "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"hrp-ood train: error: cannot write {run / 'last.pt'}: No space left on device "
        "(ENOSPC); free some space or choose another output folder"
    )
    monkeypatch.undo()
    after = {
        p.name: p.read_bytes()
        for p in run.iterdir()
        if p.is_file() and p.name not in (".lock", "train.log", "config.yaml")
    }
    assert after == before, "the last checkpoint and metrics are kept, and no temporary file is left"
    assert sorted(p.name for p in (run / "signals").iterdir()) == signals_before  # nor signals of the lost epoch


@pytest.mark.parametrize(
    "failure",
    [
        MemoryError(),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"),
    ],
)
def test_running_out_of_memory_is_one_line(ws, capsys, monkeypatch, failure):
    """e.g. `evaluate --arch … --image-size 4096` on a large ID set: a 76-line MemoryError before."""

    def exhausted(request):
        raise failure

    monkeypatch.setattr("hrp_ood.eval.session.evaluate", exhausted)
    assert main(ws.evaluate("ckpts/nope.pt")) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("hrp-ood evaluate: error: out of memory (")
    assert err.endswith("lower --batch-size or --image-size, or give the command fewer images")
