"""End to end through the real CLI: `hrp-ood train` → `evaluate` (five OOD sets, five on-disk formats) →
`report` → `export`. Every number the outputs hold is recomputed here, independently of the evaluation code:
metrics from scores.npz, scores and ID accuracy from a forward pass of the checkpoint's own weights."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_train_args
from fakes import FakeSplit, save_image, write_cifar10, write_far_ood_sets
from hrp_ood.postprocessors import create_postprocessor, list_postprocessors
from hrp_ood.postprocessors.featureset import FeatureSet
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_auc_score
from test_models import openood_expected_shapes

from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.data import images as images_module
from hrp_ood.data.noise import load_noise
from hrp_ood.eval import features as features_module
from hrp_ood.eval.metrics import ood_metrics
from hrp_ood.models import create_model
from hrp_ood.models.small_cnn import SmallCNN

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

OOD_SETS = ("svhn", "lsun", "places365", "textures", "mnist")
METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_tpr_id")
N_TRAIN, N_TEST, N_OOD = 200, 60, 40
TINY_TRAIN = [*tiny_train_args(), "--epochs", "2", "--set", "warmup_epochs=1", "--set", "lr_milestones=[1]"]
# run name → (method, noise, seed): two noise levels, a second seed for the mean over seeds, a baseline
RUNS = {
    "hrp_sym20_s0": ("hrp", "sym20", 0),
    "hrp_sym20_s1": ("hrp", "sym20", 1),
    "hrp_sym50_s0": ("hrp", "sym50", 0),
    "ce_sym20_s0": ("ce", "sym20", 0),
}
REPORT_POSTPROCESSORS = "msp,ebo,mds"


@dataclass
class World:
    """What the module fixture wrote: ID data, OOD data (and their pixels), the run folders."""

    split: FakeSplit
    ood_root: Path
    ood_images: dict[str, np.ndarray]
    runs: Path

    def ckpt(self, run: str) -> Path:
        return self.runs / run / "last.pt"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("e2e")
    split = write_cifar10(root / "cifar", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    ood_images = write_far_ood_sets(root / "ood", n=N_OOD, seed=0)
    for name, (method, noise, seed) in RUNS.items():
        assert (
            main(
                [
                    "train",
                    "--data-root",
                    str(root / "cifar"),
                    "--method",
                    method,
                    "--noise",
                    noise,
                    "--seed",
                    str(seed),
                    "--out-dir",
                    str(root / "runs"),
                    "--name",
                    name,
                    *TINY_TRAIN,
                ]
            )
            == 0
        )
    return World(split, root / "ood", ood_images, root / "runs")


def evaluate(world: World, run: str, *extra: str) -> int:
    return main(
        ["evaluate", "--ckpt", str(world.ckpt(run)), "--data-root", str(world.ood_root), "--no-progress", *extra]
    )


def read_eval(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(folder / "scores.npz") as scores:
        return json.loads((folder / "eval.json").read_text()), {k: scores[k] for k in scores.files}


@pytest.fixture(scope="module")
def main_eval(world) -> Path:
    """hrp sym20 seed 0, ensemble, every postprocessor against the five sets, default output folder."""
    assert evaluate(world, "hrp_sym20_s0", "--ood", "all", "--postprocessor", "all") == 0
    return world.runs / "hrp_sym20_s0" / "eval_ensemble"


# ------------------------------------------------------------------------------ independent recomputation


def checkpoint_nets(ckpt: Path) -> list[SmallCNN]:
    """The checkpoint's networks rebuilt from their saved weights (strict load), in eval mode."""
    state = load_checkpoint(ckpt)
    nets = []
    for weights in state["nets"]:
        net = create_model("small_cnn", num_classes=10)
        net.load_state_dict(weights, strict=True)
        nets.append(net.eval())
    return nets


def forward(net: torch.nn.Module, images_uint8: np.ndarray, ckpt: Path) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) as float64 on (u / 255 − mean) / std with the checkpoint's saved ID statistics."""
    saved = load_checkpoint(ckpt)["dataset"]
    mean = torch.tensor(saved["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(saved["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images_uint8).float() / 255 - mean) / std
    with torch.no_grad():
        logits, features = net(x, return_feature=True)
    return logits.double().numpy(), features.double().numpy()


def ensemble_logits(ckpt: Path, images_uint8: np.ndarray) -> np.ndarray:
    """Ensemble = the members' logits averaged (SPEC §4)."""
    return np.mean([forward(net, images_uint8, ckpt)[0] for net in checkpoint_nets(ckpt)], axis=0)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((logits.argmax(axis=1) == labels).mean())


# ------------------------------------------------------------------------------ evaluate


def test_outputs_hold_one_row_per_postprocessor_and_set_equal_to_metrics_of_the_saved_scores(main_eval):
    report, scores = read_eval(main_eval)
    postprocessors = list_postprocessors()
    assert report["method"] == "hrp" and report["noise"] == "sym20" and report["seed"] == 0
    assert report["net"] == "ensemble" and report["ood_sets"] == list(OOD_SETS)
    rows = {(row["postprocessor"], row["ood"]): row for row in report["results"]}
    assert len(report["results"]) == len(rows) == len(postprocessors) * (len(OOD_SETS) + 1)
    assert set(rows) == {(pp, name) for pp in postprocessors for name in (*OOD_SETS, "mean")}
    assert set(scores) == {f"{pp}/{name}" for pp in postprocessors for name in ("id", *OOD_SETS)}

    for pp in postprocessors:
        assert scores[f"{pp}/id"].shape == (N_TEST,)
        for name in OOD_SETS:
            assert scores[f"{pp}/{name}"].shape == (N_OOD,)
            expected = ood_metrics(scores[f"{pp}/id"], scores[f"{pp}/{name}"])
            for metric in METRICS:
                assert rows[pp, name][metric] == pytest.approx(expected[metric], abs=1e-9), (pp, name, metric)
            is_ood = np.r_[np.zeros(N_TEST), np.ones(N_OOD)]  # OOD positive, score negated
            auroc = 100 * roc_auc_score(is_ood, -np.r_[scores[f"{pp}/id"], scores[f"{pp}/{name}"]])
            assert rows[pp, name]["auroc"] == pytest.approx(auroc, abs=1e-9)
        for metric in METRICS:
            mean = np.mean([rows[pp, name][metric] for name in OOD_SETS])
            assert rows[pp, "mean"][metric] == pytest.approx(mean, abs=1e-9)

    with (main_eval / "eval.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["postprocessor"], r["ood"]) for r in csv_rows] == [
        (r["postprocessor"], r["ood"]) for r in report["results"]
    ]
    for csv_row, row in zip(csv_rows, report["results"]):
        assert all(float(csv_row[m]) == pytest.approx(row[m], abs=1e-9) for m in METRICS)
    markdown = (main_eval / "eval.md").read_text()
    assert f"ID accuracy: {report['id_accuracy']:.2f}%" in markdown
    for pp in postprocessors:
        cells = [f"{rows[pp, name]['auroc']:.2f} / {rows[pp, name]['fpr95']:.2f}" for name in (*OOD_SETS, "mean")]
        assert f"| {pp} | " + " | ".join(cells) + " |" in markdown


def test_id_accuracy_and_scores_equal_a_forward_pass_of_the_checkpoint(world, main_eval):
    report, scores = read_eval(main_eval)
    ckpt = world.ckpt("hrp_sym20_s0")
    id_logits = ensemble_logits(ckpt, world.split.test_images)
    assert report["id_accuracy"] == pytest.approx(accuracy(id_logits, world.split.test_labels), abs=1e-9)
    np.testing.assert_allclose(scores["msp/id"], softmax(id_logits, axis=1).max(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["ebo/id"], logsumexp(id_logits, axis=1), rtol=1e-5, atol=1e-5)
    # the two 32×32 RGB sets pass the eval transform unchanged: their scores pin the OOD data path down too
    for name in ("svhn", "lsun"):
        ood_logits = ensemble_logits(ckpt, world.ood_images[name])
        np.testing.assert_allclose(scores[f"msp/{name}"], softmax(ood_logits, axis=1).max(axis=1), rtol=1e-5, atol=1e-6)


def test_second_evaluation_reads_the_feature_cache_and_runs_no_forward_pass(world, main_eval, monkeypatch, tmp_path):
    forward_calls = []

    def refuse_extraction(*args, **kwargs):
        raise AssertionError("extract_features called although every feature is cached")

    def counting_forward(self, *args, **kwargs):
        forward_calls.append(1)
        return original_forward(self, *args, **kwargs)

    original_forward = SmallCNN.forward
    monkeypatch.setattr(features_module, "extract_features", refuse_extraction)
    monkeypatch.setattr(SmallCNN, "forward", counting_forward)
    out = world.runs / "hrp_sym20_s0" / "eval_cached"
    assert evaluate(world, "hrp_sym20_s0", "--postprocessor", REPORT_POSTPROCESSORS, "--out", str(out)) == 0
    assert forward_calls == []
    with pytest.raises(AssertionError, match="extract_features"):  # control: an empty cache does need the pass
        evaluate(
            world,
            "hrp_sym20_s0",
            "--postprocessor",
            REPORT_POSTPROCESSORS,
            "--out",
            str(tmp_path / "o"),
            "--cache-dir",
            str(tmp_path / "empty_cache"),
        )

    first, first_scores = read_eval(main_eval)
    second, second_scores = read_eval(out)
    assert second["id_accuracy"] == first["id_accuracy"]
    first_rows = {(row["postprocessor"], row["ood"]): row for row in first["results"]}
    assert [row["postprocessor"] for row in second["results"]][:: len(OOD_SETS) + 1] == REPORT_POSTPROCESSORS.split(",")
    assert all(row == first_rows[row["postprocessor"], row["ood"]] for row in second["results"])
    for key, values in second_scores.items():
        np.testing.assert_array_equal(values, first_scores[key])


def refuse_decoding(monkeypatch, *, allow_ood: bool = False) -> None:
    """Make every reader of image data fail: the CIFAR pickles (ID) and, unless `allow_ood`, every OOD format."""
    from hrp_ood.data import cifar, images
    from hrp_ood.eval import ood_data

    def refuse(*args, **kwargs):
        raise AssertionError("an image was read although its features are cached")

    readers = [(cifar, "read_pickle")]
    if not allow_ood:  # image files, ID folders and OOD sets alike, go through images._decode_one
        readers += [(images, "_decode_one"), (ood_data, "read_svhn_mat"), (ood_data, "read_mnist_idx")]
    for module, name in readers:
        monkeypatch.setattr(module, name, refuse)


def warm_cache(world: World, tmp_path: Path) -> tuple[list[str], Path]:
    """A copy of the OOD root and a cold evaluation of ce_sym20_s0 against it: (the evaluate arguments, its out)."""
    import shutil

    shutil.copytree(world.ood_root, tmp_path / "ood")
    args = [
        "--ood",
        "all",
        "--postprocessor",
        REPORT_POSTPROCESSORS,
        "--data-root",
        str(tmp_path / "ood"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert evaluate(world, "ce_sym20_s0", *args, "--out", str(tmp_path / "cold")) == 0
    return args, tmp_path / "cold"


def test_a_warm_cache_evaluation_reads_no_image_and_gives_the_same_results(world, monkeypatch, tmp_path):
    args, cold = warm_cache(world, tmp_path)
    refuse_decoding(monkeypatch)
    assert evaluate(world, "ce_sym20_s0", *args, "--out", str(tmp_path / "warm")) == 0
    (first, first_scores), (second, second_scores) = read_eval(cold), read_eval(tmp_path / "warm")
    assert second["results"] == first["results"] and second["id_accuracy"] == first["id_accuracy"]
    assert second_scores.keys() == first_scores.keys()
    for key, values in second_scores.items():
        np.testing.assert_array_equal(values, first_scores[key])


def test_a_changed_image_file_is_decoded_again_and_only_new_pixels_are_scored_again(world, monkeypatch, tmp_path):
    args, cold = warm_cache(world, tmp_path)
    textures = sorted((tmp_path / "ood" / "dtd" / "images").rglob("*.png"))
    save_image(textures[0], 255 - world.ood_images["textures"][0])  # new pixels
    lsun = tmp_path / "ood" / "images_classic" / "lsun" / "test" / "0000.png"
    os.utime(lsun, ns=(lsun.stat().st_atime_ns, lsun.stat().st_mtime_ns + 10**9))  # a new time, the same pixels
    refuse_decoding(monkeypatch, allow_ood=True)  # the ID data is unchanged: still read from the cache
    decoded, passes = [], []
    decode_one, extract = images_module._decode_one, features_module.extract_features
    monkeypatch.setattr(images_module, "_decode_one", lambda path, *a: decoded.append(path) or decode_one(path, *a))
    monkeypatch.setattr(
        features_module,
        "extract_features",
        lambda net, images, *a, **kw: passes.append(len(images)) or extract(net, images, *a, **kw),
    )
    assert evaluate(world, "ce_sym20_s0", *args, "--out", str(tmp_path / "changed")) == 0
    assert sorted(decoded) == sorted([*textures, *sorted(lsun.parent.glob("*.png"))])
    assert passes == [N_OOD]  # textures only: lsun's pixels are those its features were made from
    first, second = read_eval(cold)[1], read_eval(tmp_path / "changed")[1]
    assert not np.array_equal(second["msp/textures"], first["msp/textures"])
    np.testing.assert_array_equal(second["msp/lsun"], first["msp/lsun"])
    decoded.clear()
    assert evaluate(world, "ce_sym20_s0", *args, "--out", str(tmp_path / "again")) == 0
    assert decoded == [] and passes == [N_OOD]  # warm again: the cache recorded the new files


def test_net_1_net_2_and_ensemble_of_a_two_network_checkpoint(world, main_eval):
    ckpt = world.ckpt("hrp_sym20_s0")
    nets = checkpoint_nets(ckpt)
    id_scores = {}
    for which in ("1", "2", "ensemble"):
        assert evaluate(world, "hrp_sym20_s0", "--net", which, "--ood", "svhn,mnist", "--postprocessor", "msp,mds") == 0
        report, scores = read_eval(world.runs / "hrp_sym20_s0" / f"eval_{which}")
        assert report["net"] == which and report["ood_sets"] == ["svhn", "mnist"]
        assert report["test_rule"] == ("mean" if which == "ensemble" else None)
        logits = (
            ensemble_logits(ckpt, world.split.test_images)
            if which == "ensemble"
            else forward(nets[int(which) - 1], world.split.test_images, ckpt)[0]
        )
        assert report["id_accuracy"] == pytest.approx(accuracy(logits, world.split.test_labels), abs=1e-9)
        np.testing.assert_allclose(scores["msp/id"], softmax(logits, axis=1).max(axis=1), rtol=1e-5, atol=1e-6)
        id_scores[which] = scores["msp/id"]
    assert not np.allclose(id_scores["1"], id_scores["2"])  # two different networks were evaluated
    np.testing.assert_array_equal(id_scores["ensemble"], read_eval(main_eval)[1]["msp/id"])


def test_net_2_of_a_single_network_checkpoint_is_a_one_line_error(world, capsys):
    out = world.runs / "ce_sym20_s0" / "eval_2"
    assert evaluate(world, "ce_sym20_s0", "--net", "2", "--ood", "svhn") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hrp-ood evaluate: error:")
    assert "--net 1" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("fit_labels", ["noisy", "pred"])
def test_fit_labels_reach_the_mahalanobis_fit(world, fit_labels):
    """MDS fitted on net 1's ID-train features with the run's noisy labels (noise.npz) or its own predictions."""
    run = "hrp_sym20_s0"
    out = world.runs / run / f"eval_fit_{fit_labels}"
    assert (
        evaluate(
            world,
            run,
            "--net",
            "1",
            "--ood",
            "svhn",
            "--postprocessor",
            "msp,mds",
            "--fit-labels",
            fit_labels,
            "--out",
            str(out),
        )
        == 0
    )
    report, scores = read_eval(out)
    assert report["fit_labels"] == fit_labels

    ckpt = world.ckpt(run)
    net = checkpoint_nets(ckpt)[0]
    train_logits, train_features = forward(net, world.split.train_images, ckpt)
    noisy_labels = load_noise(world.runs / run / "noise.npz")[0]
    labels = noisy_labels if fit_labels == "noisy" else train_logits.argmax(axis=1)
    assert len(labels) == N_TRAIN and (labels != world.split.train_labels).any()  # the fit labels matter
    mds = create_postprocessor("mds")
    mds.fit(
        FeatureSet(train_logits.astype(np.float32), train_features.astype(np.float32), labels.astype(np.int64)),
        tuple(p.detach().numpy() for p in (net.fc.weight, net.fc.bias)),
    )
    for name, images in (("id", world.split.test_images), ("svhn", world.ood_images["svhn"])):
        logits, features = forward(net, images, ckpt)
        expected = mds.score(FeatureSet(logits.astype(np.float32), features.astype(np.float32)))
        np.testing.assert_allclose(scores[f"mds/{name}"], expected, rtol=1e-6)


# ------------------------------------------------------------------------------ report


@pytest.fixture(scope="module")
def report_inputs(world) -> list[Path]:
    """eval.json of every run: ensemble, msp/ebo/mds, two OOD sets (fewer panels to draw: plotting dominates)."""
    for run in RUNS:
        out = world.runs / run / "eval_report"
        assert (
            evaluate(world, run, "--ood", "svhn,mnist", "--postprocessor", REPORT_POSTPROCESSORS, "--out", str(out))
            == 0
        )
    return [world.runs / run / "eval_report" / "eval.json" for run in RUNS]


def test_report_by_noise_cells_are_the_means_over_seeds_of_the_eval_files(report_inputs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", *map(str, report_inputs), "--by", "noise", "--out", str(out)]) == 0

    evals = {run: json.loads(path.read_text()) for run, path in zip(RUNS, report_inputs)}
    values: dict[tuple[str, str, str, str], list[float]] = {}  # (method, postprocessor, noise, metric) → seeds
    for run, report in evals.items():
        method, noise, _ = RUNS[run]
        for row in report["results"]:
            if row["ood"] == "mean":
                for metric in ("auroc", "fpr95"):
                    values.setdefault((method, row["postprocessor"], noise, metric), []).append(row[metric])
        values.setdefault((method, "ID acc.", noise, "id_accuracy"), []).append(report["id_accuracy"])

    summary = pd.read_csv(out / "report_summary.csv")
    assert len(summary) == len(values)
    for _, line in summary.iterrows():
        seeds = values[line["method"], line["postprocessor"], line["noise"], line["metric"]]
        assert line["n_seeds"] == len(seeds)
        assert line["mean"] == pytest.approx(np.mean(seeds), abs=1e-9)
        if len(seeds) > 1:
            assert line["std"] == pytest.approx(np.std(seeds, ddof=1), abs=1e-9)
    assert len(values["hrp", "msp", "sym20", "auroc"]) == 2  # the mean really is over two seeds

    # Markdown: a row per (method, postprocessor) with a metric, plus an ID-accuracy row per method;
    # a column per noise level in natural order; each cell "AUROC / FPR95" as mean ± std (1 decimal)
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0] == "| method | postprocessor | sym20 | sym50 |"
    body = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in table[1:]}
    rows_expected = {(m, pp) for (m, pp, _, _) in values}
    assert set(body) == rows_expected and len(table) - 1 == len(rows_expected)
    hrp_mds = [cell.strip() for cell in body["hrp", "mds"].strip("|").split("|")[2:]]
    assert hrp_mds == [
        " / ".join(_mean_std(values["hrp", "mds", noise, m]) for m in ("auroc", "fpr95"))
        for noise in ("sym20", "sym50")
    ]
    ce_msp = [cell.strip() for cell in body["ce", "msp"].strip("|").split("|")[2:]]
    assert ce_msp == [" / ".join(_mean_std(values["ce", "msp", "sym20", m]) for m in ("auroc", "fpr95")), "–"]

    plots = sorted((out / "plots").glob("*.png"))
    assert len(plots) == 2 * len(RUNS)  # a histogram and a ROC figure per evaluation
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def _mean_std(seeds: list[float]) -> str:
    return f"{np.mean(seeds):.1f} ± {np.std(seeds, ddof=1):.1f}" if len(seeds) > 1 else f"{seeds[0]:.1f}"


# ------------------------------------------------------------------------------ export


def test_export_of_resnet18_32x32_loads_strictly_into_openood_layout(tmp_path):
    write_cifar10(tmp_path / "cifar", n_train=30, n_test=10, seed=2)
    assert (
        main(
            [
                "train",
                "--data-root",
                str(tmp_path / "cifar"),
                "--method",
                "ce",
                "--model",
                "resnet18_32x32",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--meta-size",
                "10",
                "--out-dir",
                str(tmp_path / "runs"),
                "--name",
                "r18",
                "--set",
                "lr_milestones=[]",
                "--no-progress",
            ]
        )
        == 0
    )
    ckpt, exported = tmp_path / "runs" / "r18" / "last.pt", tmp_path / "r18_openood.ckpt"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(exported)]) == 0

    state_dict = torch.load(exported, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == openood_expected_shapes()
    fresh = create_model("resnet18_32x32", num_classes=10)
    fresh.load_state_dict(state_dict, strict=True)
    trained = load_checkpoint(ckpt)["nets"][0]
    assert all(torch.equal(fresh.state_dict()[k], trained[k]) for k in state_dict)


@pytest.mark.parametrize("run, net", [("hrp_sym20_s0", "1"), ("ce_sym20_s0", "1"), ("ce_sym20_s0", "ensemble")])
def test_every_postprocessor_runs_on_a_single_network(world: World, run, net, tmp_path):
    out = tmp_path / "single"
    assert evaluate(world, run, "--net", net, "--ood", "svhn", "--postprocessor", "all", "--out", str(out)) == 0
    rows = json.loads((out / "eval.json").read_text())["results"]
    assert {r["postprocessor"] for r in rows} == set(list_postprocessors())
    assert all(np.isfinite(r["auroc"]) for r in rows)
