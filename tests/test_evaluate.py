"""The evaluation pipeline on a tiny net and dataset: rows equal the metrics of independently recomputed scores,
the cache removes every forward pass on a rerun, and the output files parse back."""

from __future__ import annotations

import csv
import json

import fakes
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hrp_ood.postprocessors.featureset import FeatureSet
from scipy.special import logsumexp, softmax
from torch import nn

from hrp_ood.data import DataBundle
from hrp_ood.errors import UserError
from hrp_ood.eval import evaluate as evaluate_module
from hrp_ood.eval.evaluate import EvalResult, format_markdown_table, run_evaluation, write_eval_outputs
from hrp_ood.eval.metrics import ood_metrics

SIZE, NUM_CLASSES, N_TRAIN, N_TEST = 8, 3, 90, 40
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_tpr_id")


class CountingNet(fakes.CountingNet):
    """tanh features (a full-rank covariance for MDS), no dropout."""

    def __init__(self) -> None:
        super().__init__(NUM_CLASSES, SIZE, width=5, activation="tanh", dropout=0.0, scale=0.2)


def _uint8(n: int, seed: int, low: int = 0, high: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)


def _bundle() -> DataBundle:
    rng = np.random.default_rng(0)
    return DataBundle(
        name="toy",
        classes=["a", "b", "c"],
        image_size=SIZE,
        train_images=_uint8(N_TRAIN, 1),
        train_labels=rng.integers(0, NUM_CLASSES, N_TRAIN),
        test_images=_uint8(N_TEST, 2),
        test_labels=rng.integers(0, NUM_CLASSES, N_TEST),
        mean=MEAN,
        std=STD,
    )


def _ood() -> dict[str, torch.Tensor]:
    return {"dark": _uint8(30, 3, 0, 90), "bright": _uint8(25, 4, 150, 256)}


def _reference_outputs(net: CountingNet, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, feature = nn.Module.__call__(
            net.eval(), TF.normalize(images.float() / 255, list(MEAN), list(STD)), return_feature=True
        )
    return logits.double().numpy(), feature.double().numpy()


def _reference_mds(train_features: np.ndarray, train_labels: np.ndarray, features: np.ndarray) -> np.ndarray:
    """max_c −(f − μ_c)ᵀ Σ⁻¹ (f − μ_c), Σ the biased covariance of class-centred training features."""
    means = np.stack([train_features[train_labels == c].mean(axis=0) for c in range(NUM_CLASSES)])
    centred = train_features - means[train_labels]
    precision = np.linalg.inv(centred.T @ centred / len(centred))
    diff = features[:, None, :] - means[None]
    return -np.einsum("ncd,de,nce->nc", diff, precision, diff).min(axis=1)


def _reference_scores(net: CountingNet, bundle: DataBundle, images: torch.Tensor) -> dict[str, np.ndarray]:
    logits, features = _reference_outputs(net, images)
    train_features = _reference_outputs(net, bundle.train_images)[1]
    return {
        "msp": softmax(logits, axis=1).max(axis=1),
        "ebo": logsumexp(logits, axis=1),
        "mds": _reference_mds(train_features, bundle.train_labels, features),
    }


def test_rows_equal_metrics_of_independently_recomputed_scores(tmp_path):
    net, bundle, ood = CountingNet(), _bundle(), _ood()
    result = run_evaluation(net, bundle, ood, ["msp", "ebo", "mds"], cache_dir=tmp_path, cache_key="ck", batch_size=16)
    reference = {
        "id": _reference_scores(net, bundle, bundle.test_images),
        **{name: _reference_scores(net, bundle, images) for name, images in ood.items()},
    }
    rows = {(r["postprocessor"], r["ood"]): r for r in result.rows}
    assert len(result.rows) == 3 * (2 + 1)
    for method in ("msp", "ebo", "mds"):
        for set_name in ("id", "dark", "bright"):
            np.testing.assert_allclose(
                result.scores[f"{method}/{set_name}"], reference[set_name][method], rtol=1e-3, atol=1e-5
            )
        per_set = []
        for set_name in ood:
            expected = ood_metrics(reference["id"][method], reference[set_name][method])
            row = rows[(method, set_name)]
            assert row["auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
            assert all(row[k] == pytest.approx(expected[k], abs=1e-6) for k in METRICS)
            per_set.append(row)
        mean_row = rows[(method, "mean")]
        assert all(mean_row[k] == pytest.approx(np.mean([r[k] for r in per_set])) for k in METRICS)
    predicted = _reference_outputs(net, bundle.test_images)[0].argmax(axis=1)
    assert result.id_accuracy == pytest.approx(100 * np.mean(predicted == bundle.test_labels))


def test_second_evaluation_makes_no_forward_pass(tmp_path):
    net, bundle, ood = CountingNet(), _bundle(), _ood()
    first = run_evaluation(net, bundle, ood, ["msp", "mds"], cache_dir=tmp_path, cache_key="ck", batch_size=32)
    assert net.calls == 3 + 2 + 1 + 1  # train (90 / 32), test (40 / 32), dark (30), bright (25): one pass each
    net.calls = 0
    second = run_evaluation(net, bundle, ood, ["msp", "mds"], cache_dir=tmp_path, cache_key="ck", batch_size=32)
    assert net.calls == 0
    assert second.rows == first.rows
    assert all(np.array_equal(first.scores[k], second.scores[k]) for k in first.scores)
    run_evaluation(net, bundle, ood, ["msp"], cache_dir=tmp_path, cache_key="other-checkpoint")
    assert net.calls > 0  # another cache key is another checkpoint: computed afresh


class StandIn:
    """What the evaluation reads of a postprocessor besides fit/score: no OpenOOD search, fitted on ID-train."""

    fit_split, openood_sweep, fit_warnings = "train", {}, ()

    def hyperparameters(self) -> dict:
        return {}


class RecordingFit(StandIn):
    """Stand-in postprocessor: records what it was fitted on; scores by the first feature."""

    name, requires_fit, needs_network = "recorder", True, False

    def fit(self, train: FeatureSet, fc):
        self.train, self.fc = train, fc
        return self

    def score(self, data: FeatureSet) -> np.ndarray:
        return data.features[:, 0]


class InputMean(StandIn):
    """Stand-in `needs_network` postprocessor: the mean of the normalised input batch it is given."""

    name, requires_fit, needs_network = "inputmean", False, True

    def score_batch(self, net, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))


def _with_stand_ins(monkeypatch) -> dict[str, object]:
    made = {}

    def create(name, **kw):
        made[name] = {"recorder": RecordingFit, "inputmean": InputMean}[name]()
        return made[name]

    monkeypatch.setattr(evaluate_module, "create_postprocessor", create)
    return made


@pytest.mark.parametrize("fit_labels", ["clean", "noisy", "pred"])
def test_fit_labels_choose_what_the_postprocessor_is_fitted_with(tmp_path, monkeypatch, fit_labels):
    made = _with_stand_ins(monkeypatch)
    net, bundle = CountingNet(), _bundle()
    noisy = (bundle.train_labels + 1) % NUM_CLASSES
    run_evaluation(
        net,
        bundle,
        _ood(),
        ["recorder"],
        cache_dir=tmp_path,
        cache_key="ck",
        fit_labels=fit_labels,
        noisy_train_labels=noisy,
    )
    logits, features = _reference_outputs(net, bundle.train_images)
    expected = {"clean": bundle.train_labels, "noisy": noisy, "pred": logits.argmax(axis=1)}[fit_labels]
    train = made["recorder"].train
    np.testing.assert_array_equal(train.labels, expected)
    np.testing.assert_allclose(train.features, features, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(made["recorder"].fc[0], net.get_fc()[0])


def test_fit_subset_keeps_images_and_labels_aligned(tmp_path, monkeypatch):
    made = _with_stand_ins(monkeypatch)
    net, bundle = CountingNet(), _bundle()
    bundle.train_labels = np.arange(N_TRAIN) % NUM_CLASSES
    noisy = np.arange(N_TRAIN)  # unique labels: each one names the image it belongs to
    run_evaluation(
        net,
        bundle,
        _ood(),
        ["recorder"],
        cache_dir=tmp_path,
        cache_key="ck",
        fit_labels="noisy",
        noisy_train_labels=noisy,
        fit_subset=20,
    )
    train = made["recorder"].train
    assert len(train) == 20 and len(set(train.labels.tolist())) == 20
    np.testing.assert_allclose(
        train.features, _reference_outputs(net, bundle.train_images[train.labels])[1], rtol=1e-5, atol=1e-6
    )


def test_needs_network_postprocessor_gets_its_own_normalised_pass(tmp_path, monkeypatch):
    _with_stand_ins(monkeypatch)
    bundle, ood = _bundle(), _ood()
    result = run_evaluation(
        CountingNet(), bundle, ood, ["inputmean"], cache_dir=tmp_path, cache_key="ck", batch_size=16
    )
    for set_name, images in {"id": bundle.test_images, **ood}.items():
        expected = TF.normalize(images.float() / 255, list(MEAN), list(STD)).mean(dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(result.scores[f"inputmean/{set_name}"], expected, rtol=1e-5, atol=1e-6)
    # bright images have the largest normalised mean: perfectly separated from ID in the wrong direction
    assert {(r["ood"], r["auroc"]) for r in result.rows if r["ood"] == "bright"} == {("bright", 0.0)}


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"fit_labels": "noisy"}, "noisy training labels"),
        ({"fit_labels": "noisy", "noisy_train_labels": np.zeros(5, dtype=np.int64)}, "5 entries"),
        ({"fit_labels": "guess"}, "fit_labels must be one of"),
        ({"fit_subset": 0}, "fit_subset"),
    ],
)
def test_bad_fit_options_are_user_errors(tmp_path, kwargs, words):
    with pytest.raises(UserError, match=words):
        run_evaluation(CountingNet(), _bundle(), _ood(), ["mds"], cache_dir=tmp_path, cache_key="ck", **kwargs)


def test_unknown_postprocessor_and_no_ood_set_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nonexistent"):
        run_evaluation(CountingNet(), _bundle(), _ood(), ["nonexistent"], cache_dir=tmp_path, cache_key="ck")
    with pytest.raises(UserError, match="no OOD set"):
        run_evaluation(CountingNet(), _bundle(), {}, ["msp"], cache_dir=tmp_path, cache_key="ck")


ROWS = [
    {
        "postprocessor": "msp",
        "ood": "svhn",
        "auroc": 91.234,
        "fpr95": 40.0,
        "aupr_in": 90.0,
        "aupr_out": 88.0,
        "fpr95_tpr_id": 39.0,
    },
    {
        "postprocessor": "msp",
        "ood": "mean",
        "auroc": 91.234,
        "fpr95": 40.0,
        "aupr_in": 90.0,
        "aupr_out": 88.0,
        "fpr95_tpr_id": 39.0,
    },
    {
        "postprocessor": "mds",
        "ood": "svhn",
        "auroc": 80.5,
        "fpr95": 55.556,
        "aupr_in": 70.0,
        "aupr_out": 75.0,
        "fpr95_tpr_id": 60.0,
    },
    {
        "postprocessor": "mds",
        "ood": "mean",
        "auroc": 80.5,
        "fpr95": 55.556,
        "aupr_in": 70.0,
        "aupr_out": 75.0,
        "fpr95_tpr_id": 60.0,
    },
]


def test_markdown_table_known_answer():
    assert format_markdown_table(ROWS) == (
        "| postprocessor (AUROC / FPR95) | svhn | mean |\n"
        "|---|---:|---:|\n"
        "| msp | 91.23 / 40.00 | 91.23 / 40.00 |\n"
        "| mds | 80.50 / 55.56 | 80.50 / 55.56 |"
    )


def test_write_eval_outputs_files_parse_back(tmp_path):
    scores = {"msp/id": np.array([0.9, 0.8]), "msp/svhn": np.array([0.1, 0.2, 0.3])}
    result = EvalResult(rows=ROWS, id_accuracy=93.5, scores=scores)
    meta = {
        "checkpoint": tmp_path / "last.pt",
        "checkpoint_sha256": "ab" * 32,
        "seed": np.int64(3),
        "postprocessors": ["msp", "mds"],
        "ood_sets": ["svhn"],
    }
    report = write_eval_outputs(result, tmp_path / "out", meta)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["eval.csv", "eval.json", "eval.md", "scores.npz"]

    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["id_accuracy"] == 93.5 and on_disk["results"] == ROWS and on_disk["seed"] == 3
    assert on_disk["checkpoint"] == str(tmp_path / "last.pt") and on_disk["checkpoint_sha256"] == "ab" * 32
    assert report["results"] == ROWS and report["id_accuracy"] == 93.5

    with open(out / "eval.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["postprocessor"], r["ood"]) for r in csv_rows] == [(r["postprocessor"], r["ood"]) for r in ROWS]
    assert [float(r["fpr95"]) for r in csv_rows] == [r["fpr95"] for r in ROWS]

    markdown = (out / "eval.md").read_text()
    assert "93.50" in markdown and format_markdown_table(ROWS) in markdown

    with np.load(out / "scores.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["msp/id", "msp/svhn"]
        np.testing.assert_array_equal(data["msp/svhn"], scores["msp/svhn"])


def test_odin_perturbs_with_the_id_std_and_is_never_cached(tmp_path, monkeypatch):
    made = []
    real_create = evaluate_module.create_postprocessor

    def create_and_keep(name):
        made.append(real_create(name))
        return made[-1]

    monkeypatch.setattr(evaluate_module, "create_postprocessor", create_and_keep)
    net, bundle, ood = CountingNet(), _bundle(), _ood()
    result = run_evaluation(net, bundle, ood, ["odin"], cache_dir=tmp_path, cache_key="ck", batch_size=64)
    net.calls = 0
    again = run_evaluation(net, bundle, ood, ["odin"], cache_dir=tmp_path, cache_key="ck", batch_size=64)
    assert net.calls == 2 * 3  # a gradient pass and a scoring pass per batch, for ID test and both OOD sets
    assert np.array_equal(result.scores["odin/id"], again.scores["odin/id"])
    assert np.all(np.isfinite(result.scores["odin/id"])) and len(result.scores["odin/bright"]) == 25
    assert made[0].needs_network and made[0].input_std == STD


def test_non_finite_scores_of_a_postprocessor_are_one_line_naming_the_causes():
    from hrp_ood.eval.evaluate import _metric_rows

    finite = np.array([0.1, 0.2, 0.3])
    with pytest.raises(UserError, match=r"^ebo gave 1 NaN/inf score\(s\) of 3 on OOD set svhn: .* check the network's"):
        _metric_rows("ebo", finite, {"svhn": np.array([0.1, np.inf, 0.3])})
    with pytest.raises(UserError, match=r"^ebo gave 2 NaN/inf score\(s\) of 3 on the ID test set: .*--mean/--std"):
        _metric_rows("ebo", np.array([np.nan, np.nan, 0.3]), {"svhn": finite})


def test_outputs_too_large_for_float32_distances_are_one_line():
    from hrp_ood.eval.evaluate import finite_outputs

    huge = FeatureSet(logits=np.ones((2, 3), np.float32), features=np.full((2, 4), 1e20, np.float32))
    with pytest.raises(UserError, match=r"^the network's features on ID train reach 1e\+20, beyond 1e\+17 .*--std"):
        finite_outputs(huge, "ID train")
    usual = FeatureSet(logits=np.ones((2, 3), np.float32), features=np.full((2, 4), 1e6, np.float32))
    assert finite_outputs(usual, "ID train") is usual
