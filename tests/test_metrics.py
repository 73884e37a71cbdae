"""hrp_ood.eval.metrics against hand-computed answers and a plain-numpy sweep of the raw definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrp_ood.eval.metrics import accuracy, ood_metrics

KEYS = {"auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_tpr_id"}


# ---- an independent reference: threshold sweeps over the raw definitions -------------------------------


def reference_auroc(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    """Mann-Whitney: P(ID score > OOD score) + ½ P(tie)."""
    diff = id_s[:, None] - ood_s[None, :]
    return 100 * ((diff > 0).mean() + 0.5 * (diff == 0).mean())


def reference_fpr_at_recall(negatives: np.ndarray, positives: np.ndarray, recall: float = 0.95) -> float:
    """Lowest rate of negatives at or above a threshold that keeps ≥ `recall` of the positives."""
    thresholds = np.unique(np.r_[negatives, positives])
    tpr = (positives[None, :] >= thresholds[:, None]).mean(axis=1)
    fpr = (negatives[None, :] >= thresholds[:, None]).mean(axis=1)
    return 100 * fpr[tpr >= recall].min()


def reference_aupr(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Trapezoid area under (recall, precision) swept from the highest score down, starting at (0, 1)
    and stopping at the first threshold with full recall (sklearn's precision_recall_curve points)."""
    recalls, precisions = [0.0], [1.0]
    for t in np.unique(np.r_[negatives, positives])[::-1]:
        tp, fp = (positives >= t).sum(), (negatives >= t).sum()
        recalls.append(tp / positives.size)
        precisions.append(tp / (tp + fp))
        if tp == positives.size:
            break
    return 100 * np.trapezoid(precisions, recalls)


def reference_metrics(id_s: np.ndarray, ood_s: np.ndarray) -> dict[str, float]:
    return {
        "auroc": reference_auroc(id_s, ood_s),
        "fpr95": reference_fpr_at_recall(-id_s, -ood_s),  # OOD positive, score negated
        "aupr_in": reference_aupr(ood_s, id_s),
        "aupr_out": reference_aupr(-id_s, -ood_s),
        "fpr95_tpr_id": reference_fpr_at_recall(ood_s, id_s),  # ID positive
    }


# ---- known answers ------------------------------------------------------------------------------------


def test_hand_computed_toy_case():
    # sorted: .9 I, .8 I, .75 O, .7 I, .6 I, .5 O, .2 O, .1 O
    m = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.5, 0.75, 0.1, 0.2])
    assert set(m) == KEYS
    assert m["auroc"] == pytest.approx(100 * 14 / 16)  # 14 of 16 (ID, OOD) pairs ordered right
    assert m["fpr95"] == pytest.approx(50.0)  # all 4 OOD caught at score <= .75: .7, .6 lost
    assert m["fpr95_tpr_id"] == pytest.approx(25.0)  # all 4 ID kept at score >= .6: .75 let in
    # ID positive: (R, P) = (0,1) (.25,1) (.5,1) (.5,2/3) (.75,.75) (1,.8)
    assert m["aupr_in"] == pytest.approx(100 * (0.25 + 0.25 + 0.25 * (2 / 3 + 0.75) / 2 + 0.25 * (0.75 + 0.8) / 2))
    # OOD positive: (0,1) (.25,1) (.5,1) (.75,1) (.75,.75) (.75,.6) (1,2/3)
    assert m["aupr_out"] == pytest.approx(100 * (0.75 + 0.25 * (0.6 + 2 / 3) / 2))


def test_ties_are_counted_half_and_share_one_threshold():
    id_s = np.r_[np.ones(19), 0.0]  # 19 ID at 1, one at 0
    ood_s = np.r_[1.0, np.zeros(19)]  # one OOD at 1, 19 at 0
    m = ood_metrics(id_s, ood_s)
    assert m["auroc"] == pytest.approx(100 * (361 + 0.5 * 19 + 0.5 * 19) / 400)  # = 95
    assert m["fpr95"] == pytest.approx(5.0)  # threshold 0 catches 19/20 OOD and 1/20 ID
    assert m["fpr95_tpr_id"] == pytest.approx(5.0)  # threshold 1 keeps 19/20 ID and 1/20 OOD
    assert m["aupr_in"] == pytest.approx(100 * (0.95 * (1 + 0.95) / 2 + 0.05 * (0.95 + 0.5) / 2))  # 96.25
    assert m["aupr_out"] == pytest.approx(96.25)


def test_perfect_separation():
    m = ood_metrics([5.0, 6.0, 7.0], [1.0, 2.0])
    assert m == pytest.approx({"auroc": 100.0, "fpr95": 0.0, "aupr_in": 100.0, "aupr_out": 100.0, "fpr95_tpr_id": 0.0})


def test_reversed_scores_give_auroc_zero():
    m = ood_metrics([1.0, 2.0], [5.0, 6.0, 7.0])
    assert m["auroc"] == pytest.approx(0.0)
    assert m["fpr95"] == pytest.approx(100.0)
    assert m["fpr95_tpr_id"] == pytest.approx(100.0)


@pytest.mark.parametrize("seed", range(4))
def test_matches_numpy_threshold_sweep(seed):
    rng = np.random.default_rng(seed)
    id_s = rng.normal(1.0, 1.0, size=200 + 37 * seed)
    ood_s = rng.normal(-0.5, 2.0, size=150)
    assert ood_metrics(id_s, ood_s) == pytest.approx(reference_metrics(id_s, ood_s), abs=1e-9)


def test_fpr95_and_fpr95_tpr_id_differ_for_asymmetric_scores():
    rng = np.random.default_rng(7)
    id_s = rng.normal(0.0, 0.2, size=2000)  # tight ID scores
    ood_s = rng.normal(-1.0, 1.0, size=2000)  # broad OOD scores
    m = ood_metrics(id_s, ood_s)
    # OOD recall 95% needs a threshold near the OOD 95th percentile (≈ 0.64): almost no ID is above it.
    assert m["fpr95"] == pytest.approx(100 * np.mean(id_s <= np.quantile(ood_s, 0.95)), abs=0.1)
    # ID recall 95% needs a threshold near the ID 5th percentile (≈ -0.33): a quarter of OOD is above it.
    assert m["fpr95_tpr_id"] == pytest.approx(100 * np.mean(ood_s >= np.quantile(id_s, 0.05)), abs=0.1)
    assert m["fpr95"] > 95 and m["fpr95_tpr_id"] < 30


def test_swapping_roles_maps_one_fpr_onto_the_other():
    rng = np.random.default_rng(3)
    id_s, ood_s = rng.normal(1, 1, 300), rng.normal(0, 1.5, 250)
    m, swapped = ood_metrics(id_s, ood_s), ood_metrics(-ood_s, -id_s)
    assert m["fpr95_tpr_id"] == pytest.approx(swapped["fpr95"])
    assert m["aupr_in"] == pytest.approx(swapped["aupr_out"])
    assert m["auroc"] == pytest.approx(swapped["auroc"])


def test_huge_magnitudes_do_not_break_it():
    rng = np.random.default_rng(1)
    id_s, ood_s = rng.normal(1, 1, 100), rng.normal(0, 1, 80)
    base = ood_metrics(id_s, ood_s)
    assert ood_metrics(id_s * 1e300, ood_s * 1e300) == pytest.approx(base)
    assert ood_metrics(
        id_s.astype(np.float32) * np.float32(1e37), ood_s.astype(np.float32) * np.float32(1e37)
    ) == pytest.approx(base)
    assert ood_metrics([1e308, 1.7e308], [-1e308, -1.7e308])["auroc"] == pytest.approx(100.0)


def test_accepts_torch_tensors_and_column_vectors():
    id_s, ood_s = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.5, 0.75, 0.1, 0.2])
    expected = ood_metrics(id_s, ood_s)
    assert ood_metrics(torch.from_numpy(id_s), torch.from_numpy(ood_s)) == pytest.approx(expected)
    assert ood_metrics(id_s[:, None], ood_s[:, None]) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(bad):
    with pytest.raises(ValueError, match="non-finite"):
        ood_metrics([1.0, bad], [0.0])
    with pytest.raises(ValueError, match="ood_scores"):
        ood_metrics([1.0], [0.0, bad])


def test_empty_or_matrix_scores_raise():
    with pytest.raises(ValueError, match="empty"):
        ood_metrics([], [0.0])
    with pytest.raises(ValueError, match="1-D"):
        ood_metrics(np.zeros((3, 2)), [0.0])


def test_accuracy_from_logits_predictions_and_tensors():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 2])
    assert accuracy(logits, labels) == pytest.approx(50.0)
    assert accuracy(np.array([0, 1, 1, 2]), labels) == pytest.approx(100.0)
    assert accuracy(torch.from_numpy(logits), torch.from_numpy(labels)) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, labels[:3])
