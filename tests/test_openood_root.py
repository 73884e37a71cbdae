"""`hrp-ood evaluate --benchmark cifar10 [--tune]` on a generated OpenOOD data root, for a checkpoint trained on an
image folder (with `--meta-size 0`): OpenOOD's lists and preprocessing are used, and the hyper-parameters the
search chooses equal OpenOOD's rule applied to validation scores recomputed here from the written pixels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import CIFAR10_CLASSES, save_image, write_openood_cifar10_root
from PIL import Image
from scipy.spatial.distance import cdist
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_auc_score
from test_postprocessors import reference_odin
from test_tuning import OPENOOD_V15_SWEEPS, openood_hyperparam_search, recursive_generator

from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.models import create_model

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

OPENOOD_CIFAR10_MEAN, OPENOOD_CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FAR = ["mnist", "svhn", "textures", "places365"]  # OpenOOD's far-OOD order for cifar10


@dataclass
class Root:
    data: Path
    written: dict[str, tuple[np.ndarray, np.ndarray | None]]
    ckpt: Path


def write_class_folders(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """`folder/<class name>/<k>.png`, the image-folder layout `--dataset folder` trains on."""
    for k, (image, label) in enumerate(zip(images, labels)):
        (folder / CIFAR10_CLASSES[label]).mkdir(parents=True, exist_ok=True)
        save_image(folder / CIFAR10_CLASSES[label] / f"{k:04d}.png", image)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Root:
    """The OpenOOD root, and a CE network trained on an image folder of the same pictures as its train list."""
    base = tmp_path_factory.mktemp("openood")
    written = write_openood_cifar10_root(base / "data")
    for split in ("train", "test"):
        write_class_folders(base / "folder" / split, *written[split])
    assert (
        main(
            [
                "train",
                "--dataset",
                "folder",
                "--data-root",
                str(base / "folder"),
                "--method",
                "ce",
                "--meta-size",
                "0",
                "--noise",
                "none",
                "--model",
                "small_cnn",
                "--epochs",
                "2",
                "--batch-size",
                "64",
                "--out-dir",
                str(base / "runs"),
                "--name",
                "ce",
                "--set",
                "lr_milestones=[]",
                "--no-progress",
            ]
        )
        == 0
    )
    return Root(base / "data", written, base / "runs" / "ce" / "last.pt")


def evaluate(root: Root, out: Path, *extra: str) -> int:
    return main(
        [
            "evaluate",
            "--ckpt",
            str(root.ckpt),
            "--benchmark",
            "cifar10",
            "--data-root",
            str(root.data),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def network(ckpt: Path) -> torch.nn.Module:
    net = create_model("small_cnn", num_classes=10)
    net.load_state_dict(load_checkpoint(ckpt)["nets"][0])
    return net.eval()


def openood_input(images: np.ndarray) -> torch.Tensor:
    """OpenOOD's cifar10 test transform on uint8 (N, 3, H, W): Resize(32) bilinear (PIL), CenterCrop(32),
    ToTensor, Normalize with OpenOOD's cifar10 statistics."""
    resized = [
        np.asarray(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))).resize((32, 32), Image.BILINEAR))
        for im in images
    ]
    x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(OPENOOD_CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENOOD_CIFAR10_STD).view(
        1, 3, 1, 1
    )


def outputs(net: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, features = net(openood_input(images), return_feature=True)
    return logits.double().numpy(), features.double().numpy()


def candidate_scores(net, root: Root, name: str, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """ID-val and OOD-val scores of one candidate, from the written pixels (numpy / scipy / OpenOOD's ODIN)."""
    weight, bias = (p.detach().double().numpy() for p in (net.fc.weight, net.fc.bias))
    val_id, val_ood = root.written["val"][0], root.written["val_tin"][0]
    if name == "odin":
        return tuple(
            reference_odin(net, openood_input(images), params["temperature"], params["noise"], OPENOOD_CIFAR10_STD)
            for images in (val_id, val_ood)
        )
    id_features, ood_features = outputs(net, val_id)[1], outputs(net, val_ood)[1]
    if name == "react":  # OpenOOD: the percentile of the ID-val activations
        threshold = np.percentile(id_features, params["percentile"])
        return tuple(logsumexp(np.minimum(f, threshold) @ weight.T + bias, axis=1) for f in (id_features, ood_features))
    bank = outputs(net, root.written["train"][0])[1]  # knn: the ID-train list
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return tuple(
        -np.sort(cdist(unit(f), unit(bank), "sqeuclidean"), axis=1)[:, params["K"] - 1]
        for f in (id_features, ood_features)
    )


@pytest.fixture(scope="module")
def tuned(root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tuned")
    assert evaluate(root, out, "--tune", "--postprocessor", "msp,react,knn,odin") == 0
    return json.loads((out / "eval.json").read_text()) | {"out": out}


def test_the_benchmarks_lists_and_preprocessing_are_used(root, tuned):
    assert tuned["benchmark"] == "cifar10" and tuned["dataset"] == "folder" and tuned["ood_sets"] == FAR
    assert tuned["preprocessing"] == {
        "source": "openood:cifar10",
        "resize": 32,
        "crop": 32,
        "mean": list(OPENOOD_CIFAR10_MEAN),
        "std": list(OPENOOD_CIFAR10_STD),
    }
    net = network(root.ckpt)
    test_images, test_labels = root.written["test"]
    logits = outputs(net, test_images)[0]
    assert tuned["id_accuracy"] == pytest.approx(100 * np.mean(logits.argmax(axis=1) == test_labels), abs=1e-9)
    with np.load(tuned["out"] / "scores.npz") as scores:
        np.testing.assert_allclose(scores["msp/id"], softmax(logits, axis=1).max(axis=1), rtol=1e-5, atol=1e-6)
        for name in ("svhn", "places365"):  # places365 is 48x48: resized by OpenOOD's transform
            expected = softmax(outputs(net, root.written[name][0])[0], axis=1).max(axis=1)
            np.testing.assert_allclose(scores[f"msp/{name}"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["react", "knn", "odin"])
def test_tuned_values_equal_openoods_rule_on_recomputed_validation_scores(root, tuned, name):
    net = network(root.ckpt)
    sweep = OPENOOD_V15_SWEEPS[name]
    combinations = recursive_generator([list(v) for v in sweep.values()], len(sweep))
    is_ood = np.r_[np.zeros(len(root.written["val"][0])), np.ones(len(root.written["val_tin"][0]))]
    aurocs = [
        roc_auc_score(is_ood, -np.r_[candidate_scores(net, root, name, dict(zip(sweep, values)))])
        for values in combinations
    ]
    searched = tuned["tuning"]["searched"][name]
    assert searched["chosen"] == dict(zip(sweep, openood_hyperparam_search(combinations, aurocs)))
    assert [c["val_auroc"] for c in searched["candidates"]] == pytest.approx([100 * a for a in aurocs], abs=1e-4)
    assert {k: tuned["hyperparameters"][name][k] for k in sweep} == searched["chosen"]


def test_validation_split_and_fit_splits_are_recorded(root, tuned, capsys):
    lists = root.data / "benchmark_imglist" / "cifar10"
    assert tuned["validation"] == {
        "id": {"source": str(lists / "val_cifar10.txt"), "images": 60},
        "ood": {"source": str(lists / "val_tin.txt"), "images": 40},
    }
    assert tuned["fit_on"] == {"react": "id_val", "knn": "id_train"}


def test_without_tune_the_output_says_openood_would_tune(root, tmp_path, capsys):
    assert evaluate(root, tmp_path / "fixed", "--postprocessor", "msp,react,odin", "--ood", "svhn") == 0
    out = capsys.readouterr().out
    assert "OpenOOD would tune react, odin on its validation split" in out and "--tune" in out
    report = json.loads((tmp_path / "fixed" / "eval.json").read_text())
    assert report["tuning"] == {"enabled": False, "openood_would_tune": ["react", "odin"]}
    assert report["hyperparameters"]["odin"]["temperature"] == 1000.0 and report["fit_on"] == {"react": "id_val"}


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--benchmark", "cifar100"], "classifies 10 classes but OpenOOD's cifar100 benchmark has 100"),
        (["--val-ood-dir", "nowhere"], "--val-ood-dir nowhere is not a folder"),
        (["--ood", "lsun"], "unknown OOD set lsun"),
    ],
)
def test_bad_benchmark_input_is_a_one_line_error(root, tmp_path, capsys, extra, words):
    assert evaluate(root, tmp_path / "bad", "--ood", "svhn", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "bad").exists()


def test_tune_without_validation_lists_names_what_is_missing(root, tmp_path, capsys):
    bare = tmp_path / "bare"
    (bare / "benchmark_imglist" / "cifar10").mkdir(parents=True)
    assert (
        main(
            [
                "evaluate",
                "--ckpt",
                str(root.ckpt),
                "--benchmark",
                "cifar10",
                "--data-root",
                str(bare),
                "--tune",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tune needs a validation split" in err[0] and "val_cifar10.txt" in err[0]
    assert "val_tin.txt" in err[0]
