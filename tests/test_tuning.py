"""OpenOOD's automatic parameter search: grids, enumeration order and selection rule checked against OpenOOD's
own procedure (transcribed here from openood/evaluation_api/evaluator.py), and the evaluation's use of it:
the values chosen on a validation split equal that rule applied to independently computed validation scores."""

from __future__ import annotations

import fakes
import numpy as np
import pytest
import torch
from hrp_ood.postprocessors import create_postprocessor, list_postprocessors
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score
from test_evaluate import MEAN, SIZE, STD, CountingNet, _bundle, _ood, _reference_outputs, _uint8
from test_postprocessors import reference_odin

from hrp_ood.errors import UserError
from hrp_ood.eval.evaluate import run_evaluation
from hrp_ood.eval.tuning import openood_candidates, openood_choice, search_openood
from hrp_ood.eval.validation import ValidationImages

# postprocessor_sweep of OpenOOD v1.5's configs/postprocessors/<name>.yml for the methods whose search changes
# the scores (APS_mode True); ebo's list is under APS_mode False and vim's set_hyperparam cannot change its scores.
OPENOOD_V15_SWEEPS = {
    "react": {"percentile": (85, 90, 95, 99)},
    "knn": {"K": (50, 100, 200, 500, 1000)},
    "odin": {"temperature": (1, 10, 100, 1000), "noise": (0.0014, 0.0028)},
}


def recursive_generator(lists: list[list], n: int) -> list[list]:
    """OpenOOD's Evaluator.recursive_generator, as written there."""
    if n == 1:
        return [[x] for x in lists[0]]
    results = []
    temp = recursive_generator(lists, n - 1)
    for x in lists[n - 1]:
        for y in temp:
            results.append([*y, x])
    return results


def openood_hyperparam_search(combinations: list, aurocs: list[float]):
    """The selection loop of OpenOOD's Evaluator.hyperparam_search (AUROC as a fraction)."""
    max_auroc, final_index = 0, None
    for i, _ in enumerate(combinations):
        if aurocs[i] > max_auroc:
            final_index, max_auroc = i, aurocs[i]
    return combinations[final_index]


def test_every_postprocessor_declares_openood_v15s_grid():
    sweeps = {name: create_postprocessor(name).openood_sweep for name in list_postprocessors()}
    assert {name: sweep for name, sweep in sweeps.items() if sweep} == OPENOOD_V15_SWEEPS
    assert create_postprocessor("react").fit_split == "val"
    assert all(create_postprocessor(name).fit_split == "train" for name in sweeps if name != "react")


@pytest.mark.parametrize("sweep", [OPENOOD_V15_SWEEPS["odin"], {"a": (1, 2), "b": ("x", "y", "z"), "c": (0.5, 7)}])
def test_candidates_come_in_the_order_of_openoods_recursive_generator(sweep):
    names = list(sweep)
    expected = [
        dict(zip(names, values)) for values in recursive_generator([list(v) for v in sweep.values()], len(names))
    ]
    assert openood_candidates(sweep) == expected
    assert openood_candidates(OPENOOD_V15_SWEEPS["odin"])[:2] == [
        {"temperature": 1, "noise": 0.0014},
        {"temperature": 10, "noise": 0.0014},
    ]


@pytest.mark.parametrize("aurocs", [[0.6, 0.9, 0.9, 0.7], [0.9, 0.6, 0.9], [0.3, 0.2, 0.31], [0.5], [0.7, 0.8, 0.8]])
def test_choice_is_openoods_first_best(aurocs):
    assert openood_choice(aurocs) == openood_hyperparam_search(list(range(len(aurocs))), aurocs)


def test_search_records_every_candidate_and_skips_what_the_data_cannot_take():
    aurocs = {50: 0.7, 100: 0.9, 200: 0.9}

    def score(params):
        k = params["K"]
        if k not in aurocs:
            raise UserError(f"knn K={k} needs at least K ID-train samples, got 300")
        # ID scores above a fraction of the OOD scores: AUROC = aurocs[k] by construction
        n_ood_below = int(round(aurocs[k] * 10))
        return np.full(10, 5.0), np.r_[np.zeros(n_ood_below), np.full(10 - n_ood_below, 9.0)]

    result = search_openood("knn", OPENOOD_V15_SWEEPS["knn"], score)
    assert result.chosen == {"K": 100}  # the first of the tied best
    assert [c.get("val_auroc") for c in result.candidates] == pytest.approx([70.0, 90.0, 90.0, None, None])
    assert "K=500 needs at least K" in result.candidates[3]["skipped"]
    with pytest.raises(UserError, match="no setting of knn's OpenOOD search grid"):
        search_openood("knn", {"K": (500, 1000)}, score)


# ---- the search inside the evaluation, on a tiny network --------------------------------------------------------


def relu_net() -> fakes.CountingNet:
    """ReLU features with a long tail: ReAct's clipping percentile matters on them."""
    return fakes.CountingNet(3, SIZE, width=8, activation="relu", dropout=0.0, scale=1.0)


def _validation() -> ValidationImages:
    return ValidationImages(_uint8(60, 11), _uint8(50, 12, 60, 200), {"id": "id-val", "ood": "ood-val"})


def _reference_val_scores(net, bundle, validation, name: str, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Scores of one candidate computed from scratch (numpy / scipy / OpenOOD's ODIN procedure)."""
    weight, bias = (v.astype(np.float64) for v in net.get_fc())
    (id_logits, id_features), (ood_logits, ood_features) = (
        _reference_outputs(net, images) for images in (validation.id_images, validation.ood_images)
    )
    if name == "react":  # threshold: the percentile of the ID-val activations, as OpenOOD's ReAct
        threshold = np.percentile(id_features, params["percentile"])
        return tuple(logsumexp(np.minimum(f, threshold) @ weight.T + bias, axis=1) for f in (id_features, ood_features))
    if name == "knn":
        bank = _reference_outputs(net, bundle.train_images)[1]
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        return tuple(
            -np.sort(cdist(unit(f), unit(bank), "sqeuclidean"), axis=1)[:, params["K"] - 1]
            for f in (id_features, ood_features)
        )
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return tuple(
        reference_odin(net.eval(), (images.float() / 255 - mean) / std, params["temperature"], params["noise"], STD)
        for images in (validation.id_images, validation.ood_images)
    )


@pytest.mark.parametrize(
    "name, grid, make_net",
    [("react", None, relu_net), ("odin", None, relu_net), ("knn", {"K": (5, 10, 20, 40, 80)}, CountingNet)],
)
def test_tuned_values_equal_openoods_rule_on_independent_validation_scores(tmp_path, monkeypatch, name, grid, make_net):
    """knn's grid is scaled down with the 90-sample training bank (OpenOOD's K up to 1000 needs ≥ 1000); it runs
    on tanh features, which are never all zero (OpenOOD's normaliser turns a zero feature into NaN)."""
    if grid is not None:
        monkeypatch.setattr(type(create_postprocessor(name)), "openood_sweep", grid)
    net, bundle, validation = make_net(), _bundle(), _validation()
    result = run_evaluation(
        net, bundle, _ood(), [name], cache_dir=tmp_path, cache_key="ck", batch_size=32, validation=validation, tune=True
    )
    sweep = grid or OPENOOD_V15_SWEEPS[name]
    combinations = recursive_generator([list(v) for v in sweep.values()], len(sweep))
    is_ood = np.r_[np.zeros(60), np.ones(50)]
    aurocs = []
    for values in combinations:
        id_scores, ood_scores = _reference_val_scores(net, bundle, validation, name, dict(zip(sweep, values)))
        aurocs.append(roc_auc_score(is_ood, -np.r_[id_scores, ood_scores]))
    expected = dict(zip(sweep, openood_hyperparam_search(combinations, aurocs)))

    searched = result.settings["tuning"]["searched"][name]
    assert searched["chosen"] == expected
    assert [c["val_auroc"] for c in searched["candidates"]] == pytest.approx([100 * a for a in aurocs], abs=1e-6)
    assert len(set(np.round(aurocs, 9))) > 1, "the grid must matter on this data for the test to mean something"
    used = result.settings["hyperparameters"][name]
    assert {key: used[key] for key in expected} == expected
    assert result.settings["tuning"]["rule"].startswith("OpenOOD v1.5 Evaluator.hyperparam_search")


def test_react_fits_on_id_val_when_there_is_one_and_says_so(tmp_path):
    net, bundle, validation = relu_net(), _bundle(), _validation()
    with_val = run_evaluation(
        net, bundle, _ood(), ["react", "knn"], cache_dir=tmp_path, cache_key="ck", validation=validation
    )
    without = run_evaluation(net, bundle, _ood(), ["react", "knn"], cache_dir=tmp_path, cache_key="ck")
    assert with_val.settings["fit_on"] == {"react": "id_val", "knn": "id_train"}
    assert without.settings["fit_on"] == {"react": "id_train", "knn": "id_train"}
    weight, bias = (v.astype(np.float64) for v in net.get_fc())
    test_features = _reference_outputs(net, bundle.test_images)[1]
    for result, fit_images in ((with_val, validation.id_images), (without, bundle.train_images)):
        threshold = np.percentile(_reference_outputs(net, fit_images)[1], 90)
        expected = logsumexp(np.minimum(test_features, threshold) @ weight.T + bias, axis=1)
        np.testing.assert_allclose(result.scores["react/id"], expected, rtol=1e-5)
    assert with_val.settings["validation"] == {
        "id": {"source": "id-val", "images": 60},
        "ood": {"source": "ood-val", "images": 50},
    }
    assert without.settings["tuning"] == {"enabled": False, "openood_would_tune": ["react", "knn"]}


def test_tuning_without_both_validation_parts_is_a_user_error(tmp_path):
    only_id = ValidationImages(_uint8(10, 1), None, {"id": "x"})
    for validation in (None, only_id):
        with pytest.raises(UserError, match="both ID-val and OOD-val"):
            run_evaluation(
                relu_net(),
                _bundle(),
                _ood(),
                ["react"],
                cache_dir=tmp_path,
                cache_key="ck",
                validation=validation,
                tune=True,
            )
