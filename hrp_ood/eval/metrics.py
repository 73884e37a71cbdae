"""OOD-detection metrics (SPEC §4), as OpenOOD v1.5 computes them (``openood/evaluators/metrics.py``).

**The one sign convention of the package lives here.** A score is "higher = more
in-distribution" (MSP, energy, negative Mahalanobis distance, ...). OOD is the *positive*
class, as in OpenOOD, so the ROC curve is built from ``-score``.

All metrics are returned ×100:

* ``auroc``    area under the ROC curve (OOD positive); 50 = chance, 100 = every OOD sample
               scores below every ID sample, 0 = the reverse.
* ``fpr95``    OpenOOD's FPR@95 (its "recall level" definition): sweep the threshold until
               95% of OOD samples are detected (OOD recall ≥ 0.95) and report the fraction of
               ID samples wrongly flagged as OOD there.
* ``aupr_in``  area under the precision-recall curve with ID positive and score as is.
* ``aupr_out`` the same with OOD positive and ``-score``.
* ``fpr95_tpr_id`` the classic "FPR at 95% TPR" of the OOD literature before OpenOOD v1.5
               (Hendrycks & Gimpel; Liang et al.): ID is the positive class, the threshold keeps
               95% of ID samples, and the value is the fraction of OOD samples still accepted.

``fpr95`` and ``fpr95_tpr_id`` are different quantities: the first is an error rate on ID
data at fixed OOD recall, the second an error rate on OOD data at fixed ID recall. They agree
only for symmetric score distributions (see ``tests/test_metrics.py``).

Areas use ``sklearn.metrics.auc`` (trapezoid) over ``roc_curve`` / ``precision_recall_curve``
with sklearn's defaults, exactly as OpenOOD calls them. One consequence worth knowing:
``roc_curve(drop_intermediate=True)`` drops collinear points, so with *tied* ID/OOD scores the
FPR95 point can move to the end of a tied run; we keep that behaviour for parity with OpenOOD.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

RECALL_LEVEL = 0.95


def _as_numpy(values: Any) -> np.ndarray:
    """numpy view of an array-like or a (possibly device) torch tensor."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _as_scores(values: Any, what: str) -> np.ndarray:
    scores = _as_numpy(values).astype(np.float64, copy=False)
    if scores.ndim == 2 and scores.shape[1] == 1:  # a column vector is fine
        scores = scores[:, 0]
    if scores.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of scores, got shape {scores.shape}")
    if scores.size == 0:
        raise ValueError(f"{what} is empty: need at least one score")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(
            f"{what} holds {int(bad.sum())} non-finite score(s) (NaN/inf) out of {scores.size}; "
            "fix the postprocessor or the features before computing metrics"
        )
    return scores


def _fpr_at_recall(negative_scores: np.ndarray, positive_scores: np.ndarray, recall: float) -> float:
    """FPR at the first ROC point whose TPR reaches `recall` (positives are the *higher* scores).

    This is OpenOOD's ``fpr_list[np.argmax(tpr_list >= tpr_th)]``.
    """
    y_true = np.r_[np.zeros(negative_scores.size), np.ones(positive_scores.size)]
    fpr, tpr, _ = skm.roc_curve(y_true, np.r_[negative_scores, positive_scores])
    return float(fpr[np.argmax(tpr >= recall)])


def ood_metrics(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """AUROC, FPR95, AUPR-In, AUPR-Out and FPR@95%-ID-TPR (all ×100) of one ID/OOD split.

    Scores are "higher = more in-distribution"; OOD is the positive class (module docstring).
    Raises ValueError on empty or non-finite input.
    """
    id_conf = _as_scores(id_scores, "id_scores")
    ood_conf = _as_scores(ood_scores, "ood_scores")
    conf = np.r_[id_conf, ood_conf]
    ood_indicator = np.r_[np.zeros(id_conf.size), np.ones(ood_conf.size)]

    # sklearn finds distinct thresholds with np.diff: near ±1.8e308 a difference overflows to ±inf,
    # which still reads as "distinct", so the warning is noise.
    with np.errstate(over="ignore"):
        fpr_list, tpr_list = _ood_positive_roc(id_conf, ood_conf)
        precision_in, recall_in, _ = skm.precision_recall_curve(1 - ood_indicator, conf)
        precision_out, recall_out, _ = skm.precision_recall_curve(ood_indicator, -conf)
        # ID positive: OOD scores are the negatives, ID scores the positives, score as is.
        fpr95_tpr_id = _fpr_at_recall(ood_conf, id_conf, RECALL_LEVEL)

    results = {
        "auroc": skm.auc(fpr_list, tpr_list),
        "fpr95": fpr_list[np.argmax(tpr_list >= RECALL_LEVEL)],
        "aupr_in": skm.auc(recall_in, precision_in),
        "aupr_out": skm.auc(recall_out, precision_out),
        "fpr95_tpr_id": fpr95_tpr_id,
    }
    return {name: 100.0 * float(value) for name, value in results.items()}


def auroc_fraction(id_scores: Any, ood_scores: Any) -> float:
    """AUROC in [0, 1], OOD positive: the number OpenOOD's parameter search compares (``compute_all_metrics()[1]``).

    Unscaled, so two settings are compared on exactly the value OpenOOD compares.
    """
    id_conf = _as_scores(id_scores, "id_scores")
    ood_conf = _as_scores(ood_scores, "ood_scores")
    with np.errstate(over="ignore"):  # see ood_metrics
        return float(skm.auc(*_ood_positive_roc(id_conf, ood_conf)))


def _ood_positive_roc(id_conf: np.ndarray, ood_conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of OpenOOD's ``roc_curve(ood_indicator, -conf)`` over ID scores then OOD scores."""
    ood_indicator = np.r_[np.zeros(id_conf.size), np.ones(ood_conf.size)]
    fpr, tpr, _ = skm.roc_curve(ood_indicator, -np.r_[id_conf, ood_conf])
    return fpr, tpr


def accuracy(logits_or_preds: Any, labels: Any) -> float:
    """Top-1 accuracy ×100. Accepts (N, C) logits/probabilities (argmax taken) or (N,) predictions."""
    preds = _as_numpy(logits_or_preds)
    labels = _as_numpy(labels).reshape(-1)
    if preds.ndim == 2:
        preds = preds.argmax(axis=1)
    elif preds.ndim != 1:
        raise ValueError(f"accuracy expects (N, C) logits or (N,) predictions, got shape {preds.shape}")
    if preds.shape[0] != labels.shape[0]:
        raise ValueError(f"accuracy: {preds.shape[0]} predictions but {labels.shape[0]} labels")
    if labels.size == 0:
        raise ValueError("accuracy: no samples")
    return 100.0 * float(np.mean(preds == labels))
