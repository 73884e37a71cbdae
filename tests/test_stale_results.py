"""Issue 11: no stale or mixed OOD numbers. A checkpoint replaced while it is read, an image of an OOD folder
replaced, an evaluation that failed part-way, a set named only with --ood-dir, an export to OpenOOD: each case is
evaluated through the real CLI and compared with a fresh evaluation (empty cache) of what is on disk."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_args
from fakes import random_images, write_cifar10, write_image_folder, write_ood_folder

from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.eval import evaluate as evaluate_module

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

TINY = tiny_train_args(method="ce", batch_size=16, meta_size=10)
N_OOD = 151  # more than the 64 images the cache once fingerprinted; image 1 was not among them


@dataclass
class World:
    root: Path
    epoch1: Path  # last.pt after one epoch
    epoch2: Path  # last.pt of the same run after two
    folder_run: Path  # last.pt of a run on an image folder (mean/std measured on its images)
    ood: Path

    def evaluate(self, ckpt: Path, out: Path, cache: Path, *extra: str) -> int:
        return main(
            [
                "evaluate",
                "--ckpt",
                str(ckpt),
                "--postprocessor",
                "msp,ebo",
                "--device",
                "cpu",
                "--ood-dir",
                f"mine={self.ood}",
                "--ood",
                "mine",
                "--out",
                str(out),
                "--cache-dir",
                str(cache),
                "--no-progress",
                *extra,
            ]
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("stale")
    write_cifar10(root / "cifar", n_train=80, n_test=30, seed=0)
    runs = str(root / "runs")
    train = ["train", "--data-root", str(root / "cifar"), "--out-dir", runs, "--name", "r", *TINY]
    assert main([*train, "--epochs", "1"]) == 0
    shutil.copy(root / "runs" / "r" / "last.pt", root / "epoch1.pt")
    assert main([*train, "--epochs", "2", "--resume"]) == 0
    write_image_folder(root / "folder", classes=("a", "b", "c"), n_per_class=12, seed=5)
    assert (
        main(
            [
                "train",
                "--dataset",
                "folder",
                "--data-root",
                str(root / "folder"),
                "--out-dir",
                runs,
                "--name",
                "f",
                "--epochs",
                "1",
                *TINY,
                "--meta-size",
                "6",
            ]
        )
        == 0
    )
    write_ood_folder(root / "ood", random_images(N_OOD, seed=7))
    return World(
        root, root / "epoch1.pt", root / "runs" / "r" / "last.pt", root / "runs" / "f" / "last.pt", root / "ood"
    )


def read_eval(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(folder / "scores.npz") as scores:
        return json.loads((folder / "eval.json").read_text()), {k: scores[k] for k in scores.files}


def assert_same_numbers(folder: Path, reference: Path) -> None:
    (report, scores), (expected, expected_scores) = read_eval(folder), read_eval(reference)
    assert report["id_accuracy"] == expected["id_accuracy"]
    assert report["results"] == expected["results"]
    assert scores.keys() == expected_scores.keys()
    for key in scores:
        np.testing.assert_array_equal(scores[key], expected_scores[key], err_msg=key)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_checkpoint_replaced_while_it_is_loaded_is_named_by_the_bytes_loaded(world, tmp_path, monkeypatch):
    ckpt, cache = tmp_path / "last.pt", tmp_path / "cache"
    shutil.copy(world.epoch1, ckpt)
    load = torch.load

    def load_then_training_writes_the_next_epoch(*args, **kwargs):
        state = load(*args, **kwargs)
        shutil.copy(world.epoch2, ckpt)
        return state

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", load_then_training_writes_the_next_epoch)
        assert world.evaluate(ckpt, tmp_path / "first", cache) == 0
    first, _ = read_eval(tmp_path / "first")
    assert (first["epoch"], first["checkpoint_sha256"]) == (1, sha256(world.epoch1)), (
        "eval.json names the epoch and the hash of the bytes that were evaluated"
    )
    assert_same_numbers(tmp_path / "first", _fresh(world, world.epoch1, tmp_path / "fresh1"))

    assert world.evaluate(ckpt, tmp_path / "second", cache) == 0  # the file now holds epoch 2
    second, _ = read_eval(tmp_path / "second")
    assert (second["epoch"], second["checkpoint_sha256"]) == (2, sha256(world.epoch2))
    assert_same_numbers(tmp_path / "second", _fresh(world, world.epoch2, tmp_path / "fresh2"))


def _fresh(world: World, ckpt: Path, folder: Path) -> Path:
    """An evaluation of `ckpt` with an empty cache, into `folder`/out."""
    assert world.evaluate(ckpt, folder / "out", folder / "cache") == 0
    return folder / "out"


def test_an_image_replaced_in_an_ood_folder_is_not_served_from_the_cache(world, tmp_path):
    ood = tmp_path / "ood"
    shutil.copytree(world.ood, ood)
    world_here = World(world.root, world.epoch1, world.epoch2, world.folder_run, ood)
    cache = tmp_path / "cache"
    assert world_here.evaluate(world.epoch2, tmp_path / "before", cache) == 0
    write_ood_folder(tmp_path / "new", 255 - random_images(2, seed=7))  # new content for image 1
    shutil.copy(tmp_path / "new" / "0001.png", ood / "0001.png")
    assert world_here.evaluate(world.epoch2, tmp_path / "after", cache) == 0
    assert_same_numbers(tmp_path / "after", _fresh(world_here, world.epoch2, tmp_path / "fresh"))
    _, before = read_eval(tmp_path / "before")
    _, after = read_eval(tmp_path / "after")
    assert not np.array_equal(before["msp/mine"], after["msp/mine"])


def test_report_refuses_an_eval_json_beside_the_scores_of_another_evaluation(world, tmp_path, capsys):
    out, cache = tmp_path / "eval", tmp_path / "cache"
    assert world.evaluate(world.epoch1, out, cache) == 0
    older_scores = (out / "scores.npz").read_bytes()
    assert world.evaluate(world.epoch2, out, cache) == 0
    (out / "scores.npz").write_bytes(older_scores)  # what an interrupted evaluation could leave
    capsys.readouterr()
    assert main(["report", str(out / "eval.json"), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the scores.npz its eval.json was written with" in err, err
    assert not (tmp_path / "report").exists()
    assert main(["report", str(out / "eval.json"), "--out", str(tmp_path / "report"), "--no-plots"]) == 0


@pytest.mark.parametrize("failing_write", [1, 2, 3, 4])
def test_an_evaluation_failing_part_way_never_pairs_new_and_old_files(
    world, tmp_path, monkeypatch, capsys, failing_write
):
    """The disk fills up at the k-th of the four output files of a second evaluation into the same folder: `report`
    then either plots the first evaluation, whole, or refuses the folder; it never pairs files of the two."""
    out, cache = tmp_path / "eval", tmp_path / "cache"
    assert world.evaluate(world.epoch1, out, cache) == 0
    first_json, first_scores = (out / "eval.json").read_bytes(), (out / "scores.npz").read_bytes()
    writes = []
    for name in ("atomic_write", "atomic_write_text"):
        monkeypatch.setattr(evaluate_module, name, _disk_full_at(getattr(evaluate_module, name), writes, failing_write))
    capsys.readouterr()
    assert world.evaluate(world.epoch2, out, cache) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("hrp-ood evaluate: error: ")
    assert "No space left on device (ENOSPC)" in err
    monkeypatch.undo()
    code = main(["report", str(out / "eval.json"), "--out", str(tmp_path / "report")])
    if code == 0:
        assert (out / "eval.json").read_bytes() == first_json and (out / "scores.npz").read_bytes() == first_scores
    else:
        assert code == 2 and "is not the scores.npz its eval.json was written with" in capsys.readouterr().err


def _disk_full_at(write, writes: list, failing_write: int):
    """`write` (atomic_write or atomic_write_text), failing with a full disk at the `failing_write`-th output write."""

    def wrapper(path, content):
        writes.append(path)
        if len(writes) == failing_write:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, content)

    return wrapper


def test_a_set_given_with_ood_dir_is_scored_even_when_ood_does_not_list_it(world, tmp_path):
    other = tmp_path / "textures"
    write_ood_folder(other, random_images(10, seed=9))
    assert world.evaluate(world.epoch2, tmp_path / "out", tmp_path / "cache", "--ood-dir", f"textures={other}") == 0
    report, scores = read_eval(tmp_path / "out")
    assert report["ood_sets"] == ["mine", "textures"]
    assert {(r["postprocessor"], r["ood"]) for r in report["results"]} >= {("msp", "textures"), ("ebo", "textures")}
    assert len(scores["msp/textures"]) == 10


@pytest.mark.parametrize("run, matches", [("folder_run", False), ("epoch1", True)], ids=["image-folder", "cifar10"])
def test_export_writes_the_normalisation_beside_the_state_dict(world, run, matches, tmp_path, capsys):
    ckpt = getattr(world, run)
    out = tmp_path / "net.pt"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    saved = load_checkpoint(ckpt)["dataset"]
    info = json.loads((tmp_path / "net.pt.normalization.json").read_text())
    assert (info["mean"], info["std"], info["image_size"]) == (saved["mean"], saved["std"], saved["image_size"])
    assert info["matches_openood"] is matches and info["openood_benchmark"] == "cifar10"
    assert ("differs from OpenOOD's cifar10 constants" in stdout) is not matches, stdout
    assert f"mean ({saved['mean'][0]:.4f}" in stdout
    assert torch.load(out, weights_only=True).keys() == load_checkpoint(ckpt)["nets"][0].keys()
