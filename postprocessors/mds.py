"""Mahalanobis distance to class-conditional Gaussians with one shared covariance (MDS)."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from hrp_ood.postprocessors.featureset import FeatureSet
from scipy import sparse
from sklearn.covariance import EmpiricalCovariance

from .base import Postprocessor, register_postprocessor

log = logging.getLogger(__name__)


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(means (K, D) float64, classes (K,)) for the K classes that have at least one sample.

    μ_c = (1/N_c) Σ_{i: y_i = c} f_i, as one sparse (C, N) one-hot product (no per-class loop).
    """
    n = labels.shape[0]
    one_hot = sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(num_classes, n))
    sums = one_hot @ features.astype(np.float64)
    counts = np.bincount(labels, minlength=num_classes)
    classes = np.flatnonzero(counts)
    return sums[classes] / counts[classes, None], classes


def shared_precision(
    features: np.ndarray, labels: np.ndarray, means: np.ndarray, classes: np.ndarray, num_classes: int
) -> np.ndarray:
    """Σ⁺ for the tied covariance, exactly as OpenOOD's ``MDSPostprocessor.setup``.

    Σ = (1/N) Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ is the maximum-likelihood estimate on
    class-centred features, fitted with ``EmpiricalCovariance(assume_centered=False)`` (whose
    own mean subtraction is a no-op up to rounding) on float32 data; the precision is sklearn's
    pseudo-inverse ``pinvh(Σ)``.
    """
    return _shared_covariance(features, labels, means, classes, num_classes).precision_


def _shared_covariance(
    features: np.ndarray, labels: np.ndarray, means: np.ndarray, classes: np.ndarray, num_classes: int
) -> EmpiricalCovariance:
    """The fitted estimator of `shared_precision` (its `covariance_` and `precision_`)."""
    row_of_class = np.full(num_classes, -1)
    row_of_class[classes] = np.arange(classes.size)
    centred = features - means.astype(np.float32)[row_of_class[labels]]
    return EmpiricalCovariance(assume_centered=False).fit(centred.astype(np.float32))


def singular_covariance_warning(covariance: np.ndarray, samples: int, classes: int) -> str | None:
    """The warning for a shared covariance that is singular, or None: fewer class-centred samples than feature
    dimensions (N − K < D: rank at most N − K), or a rank below D at the estimate's float32 precision (a feature that
    never varies). Σ⁺ is then a pseudo-inverse and the distances depend on rounding."""
    dim = covariance.shape[0]
    rank = int(np.linalg.matrix_rank(covariance, hermitian=True))
    if samples - classes >= dim and rank == dim:
        return None
    return (
        f"mds: the shared covariance of the {dim}-d features is singular (rank {rank} of {dim}; fitted on {samples} "
        f"ID training samples in {classes} classes): its pseudo-inverse gives scores without a stable meaning "
        "(OpenOOD's would be as ill-posed); fit on more ID training images than feature dimensions"
    )


@register_postprocessor("mds")
class Mahalanobis(Postprocessor):
    """Score = max_c −(f − μ_c)ᵀ Σ⁺ (f − μ_c): class means and one shared covariance from ID-train features.

    Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018, https://arxiv.org/abs/1807.03888 (OpenOOD v1.5 ``mds``:
    penultimate features only, no input perturbation, no layer ensemble).

    The class of a training sample is whatever ``train.labels`` holds (clean, noisy or
    predicted labels: the evaluator decides). Classes without any training sample are left out
    of the max (OpenOOD would produce NaN for them); a warning is logged.
    """

    requires_fit = True
    uses_features = True

    def _fit(self, train: FeatureSet, weight: np.ndarray, bias: np.ndarray) -> None:
        num_classes = weight.shape[0]
        labels = _check_labels(train.labels, num_classes, len(train))
        features = np.asarray(train.features, dtype=np.float32)
        start = time.perf_counter()
        means, classes = class_means(features, labels, num_classes)
        if classes.size < num_classes:
            log.warning(
                "mds: %d of %d classes have no training sample and are left out",
                num_classes - classes.size,
                num_classes,
            )
        estimate = _shared_covariance(features, labels, means, classes, num_classes)
        warning = singular_covariance_warning(estimate.covariance_, len(labels), classes.size)
        if warning:
            log.warning("%s", warning)
            self.fit_warnings.append(warning)
        self.class_means = torch.from_numpy(means.astype(np.float32))
        self.precision = torch.from_numpy(estimate.precision_.astype(np.float32))
        self.classes = classes
        log.info(
            "mds: fitted %d classes on %s features in %.2f s", classes.size, features.shape, time.perf_counter() - start
        )

    @staticmethod
    def mahalanobis_score(features: torch.Tensor, class_means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        """s(f) = max_c −d_c(f),  d_c(f) = (f − μ_c)ᵀ Σ⁺ (f − μ_c).

        Expanded as d_c = fᵀΣ⁺f − 2 (Σ⁺f)ᵀμ_c + μ_cᵀΣ⁺μ_c (matrix products, no (N, C, D)
        tensor). Distances do not change when f and μ_c move by the same vector, so both are
        first centred on the mean class mean: the three terms then stay of the order of the
        distances themselves and float32 does not lose them to cancellation.
        """
        centre = class_means.mean(dim=0)
        f = features - centre
        means = class_means - centre
        pf = f @ precision
        distances = (pf * f).sum(dim=1, keepdim=True) - 2.0 * pf @ means.T + ((means @ precision) * means).sum(dim=1)
        return -distances.min(dim=1).values

    def score_tensors(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self._check_features(features)
        return self.mahalanobis_score(
            features, self._fitted("class_means", features), self._fitted("precision", features)
        )


def _check_labels(labels: np.ndarray | None, num_classes: int, n: int) -> np.ndarray:
    if labels is None:
        raise ValueError("mds needs ID-train labels (train.labels is None)")
    labels = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"mds: {labels.shape[0]} labels for {n} training samples")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"mds: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels
