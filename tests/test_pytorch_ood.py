"""A second, independent reference: pytorch-ood's detectors (pytorch-ood 0.4.0, installed by the test extra) run live
on the same features and networks as our postprocessors. Each test states the conventions in which pytorch-ood
differs from us (we follow OpenOOD v1.5) and checks that, those conventions undone, the numbers are the same.

pytorch-ood's scores are *outlier* scores (higher = more OOD); ours are "higher = more in-distribution".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hrp_ood.postprocessors import create_postprocessor
from hrp_ood.postprocessors.featureset import FeatureSet
from pytorch_ood import detector as pod
from test_postprocessors import random_problem, seeded, separable_problem
from torch import nn

from hrp_ood.eval.metrics import ood_metrics


def tensors(data: FeatureSet) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.logits), torch.from_numpy(data.features)


def head(weight: np.ndarray, bias: np.ndarray):
    w, b = torch.from_numpy(weight), torch.from_numpy(bias)
    return lambda features: features @ w.T + b


def test_msp_energy_and_maxlogit_are_pytorch_oods_negated():
    """MSP: theirs −max softmax(z/T). Energy: theirs the energy E = −T·logsumexp(z/T), ours the negative energy
    (OpenOOD's ebo). MaxLogit: theirs −max z. Sign only: ours = −theirs."""
    _, test, _ = random_problem()
    logits, _ = tensors(test)
    np.testing.assert_allclose(
        create_postprocessor("msp").score(test), -pod.MaxSoftmax(None).predict_logits(logits).numpy(), rtol=1e-6
    )
    for temperature in (1.0, 2.5):
        np.testing.assert_allclose(
            create_postprocessor("ebo", temperature=temperature).score(test),
            -pod.EnergyBased(None, t=temperature).predict_logits(logits).numpy(),
            rtol=1e-6,
        )
    np.testing.assert_allclose(
        create_postprocessor("maxlogit").score(test), -pod.MaxLogit(None).predict_logits(logits).numpy(), rtol=1e-6
    )


def test_mahalanobis_is_pytorch_oods_up_to_its_scatter_scale_half_and_sign():
    """Theirs: ½ min_c (f − μ_c)ᵀ (S + 10⁻⁶ I)⁻¹ (f − μ_c) with S = Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ, the class-
    centred *scatter*, not divided by N (and torch.linalg.inv in float32). Ours (OpenOOD's): −min_c d_c with the
    maximum-likelihood covariance S / N (sklearn's pinvh). So ours = −2N · theirs, up to the 10⁻⁶ ridge; the ranking,
    hence every metric, is the same."""
    train, id_test, ood_test, fc = separable_problem(n_train=600, n_test=150, dim=40)
    ours = create_postprocessor("mds").fit(train, fc)
    theirs = pod.Mahalanobis(None).fit_features(torch.from_numpy(train.features), torch.from_numpy(train.labels))
    for data in (id_test, ood_test):
        np.testing.assert_allclose(
            ours.score(data), -2 * len(train) * theirs.predict_features(tensors(data)[1]).numpy(), rtol=1e-5
        )
    ours_auroc = ood_metrics(ours.score(id_test), ours.score(ood_test))["auroc"]
    their_scores = [-theirs.predict_features(tensors(d)[1]).numpy() for d in (id_test, ood_test)]
    assert ours_auroc == pytest.approx(ood_metrics(*their_scores)["auroc"], abs=1e-9)


@pytest.mark.parametrize("k", [1, 10, 50])
def test_knn_is_pytorch_oods_distance_squared_and_negated(k):
    """Both normalise features to unit length and take the k-th nearest ID-train neighbour. Theirs: the Euclidean
    distance (sklearn NearestNeighbors); ours (OpenOOD's, faiss IndexFlatL2): minus the *squared* distance. A zero
    feature stays zero in both (their clamp, ours); OpenOOD's normaliser makes it NaN. So ours = −theirs²."""
    train, test, fc = random_problem()
    ours = create_postprocessor("knn", K=k).fit(train, fc).score(test)
    theirs = pod.KNN(None, k=k).fit_features(torch.from_numpy(train.features), torch.from_numpy(train.labels))
    np.testing.assert_allclose(ours, -(theirs.predict_features(tensors(test)[1]).numpy() ** 2), rtol=1e-4, atol=1e-6)


def test_vim_is_pytorch_oods_negated():
    """Same origin u = −W⁺b, same residual space (the eigenvectors of the covariance around u outside the top d,
    eigh), same α = mean max-logit / mean residual norm on ID-train. Theirs: α‖(f − u)R‖ − logsumexp(z), fitted in
    float32 torch; ours: logsumexp(z) − α‖(f − u)R‖ (OpenOOD's sign), fitted in float64. Theirs also shrinks a d ≥ D
    to D // 2 where ours refuses it. So ours = −theirs up to float32 rounding."""
    train, test, (weight, bias) = random_problem(dim=24)
    ours = create_postprocessor("vim", dim=10).fit(train, (weight, bias))
    theirs = pod.ViM(None, d=10, w=torch.from_numpy(weight), b=torch.from_numpy(bias))
    theirs.fit_features(torch.from_numpy(train.features), torch.from_numpy(train.labels))
    assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-4)
    np.testing.assert_allclose(
        ours.score(test), -theirs.predict_features(tensors(test)[1]).numpy(), rtol=1e-5, atol=1e-4
    )


def test_react_is_pytorch_oods_negated_when_fitted_on_the_same_activations():
    """Both clip the penultimate activations from above at a percentile of ID activations and score the energy of
    the clipped logits. Theirs: the percentile as a fraction (0.9), taken over whatever it is fitted on (ID-train
    in its docs), outlier score −logsumexp; ours: the percentile in % (OpenOOD's 90), taken over ID-val when the
    evaluation has one (OpenOOD) and ID-train otherwise, score +logsumexp. Fitted on the same activations: same
    threshold, ours = −theirs."""
    train, test, (weight, bias) = random_problem()
    ours = create_postprocessor("react", percentile=90).fit(train, (weight, bias))
    theirs = pod.ReAct(backbone=None, head=head(weight, bias), percentile=0.9)
    theirs.fit_feature_maps(torch.from_numpy(train.features), torch.from_numpy(train.labels))
    assert ours.threshold == pytest.approx(theirs.threshold, rel=1e-7)
    np.testing.assert_allclose(ours.score(test), -theirs.predict_feature_maps(tensors(test)[1]).numpy(), rtol=1e-5)


def test_knn_and_react_search_grids_are_the_ones_pytorch_ood_also_takes_from_openood():
    """pytorch-ood's hyperparameter_space for KNN and ReAct states it matches OpenOOD's sweep: a second source for
    our grids (ReAct's percentiles as fractions there)."""
    assert list(create_postprocessor("knn").openood_sweep["K"]) == pod.KNN.hyperparameter_space["k"]
    assert [p / 100 for p in create_postprocessor("react").openood_sweep["percentile"]] == pytest.approx(
        pod.ReAct.hyperparameter_space["percentile"]
    )


class NegativeReluNet(nn.Module):
    """logits = W · relu(−x) + b: the input gradient is exactly 0 wherever x ≥ 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = seeded(nn.Linear(12, 3), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(-x.flatten(1)))


def test_odin_is_pytorch_oods_negated_except_where_the_input_gradient_is_zero():
    """Both perturb x̂ = x − ε · s / σ with s the sign of the gradient of the cross-entropy of z(x)/T against the
    predicted class, then score max softmax(z(x̂)/T). Theirs: s = sign(∇) with sign(0) = 0, outlier score −max
    softmax; ours (OpenOOD's torch.ge(∇, 0)): sign(0) = +1, +max softmax. Where no input gradient is exactly 0,
    ours = −theirs; a pixel with a zero gradient is moved by ours and not by theirs."""
    std = (0.2470, 0.2435, 0.2616)
    smooth = seeded(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 5)), 0)
    x = torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = create_postprocessor("odin", temperature=10.0, noise=0.0014, input_std=std)
    theirs = pod.ODIN(smooth.eval(), eps=0.0014, temperature=10.0, norm_std=list(std))
    np.testing.assert_allclose(ours.score_batch(smooth, x).numpy(), -theirs.predict(x).detach().numpy(), rtol=1e-6)

    dead = NegativeReluNet().eval()
    at_zero = torch.zeros(4, 3, 2, 2)  # relu(−x) has a zero gradient here, and ours steps into its active side
    ours_dead = ours.score_batch(dead, at_zero).numpy()
    theirs_dead = -pod.ODIN(dead, eps=0.0014, temperature=10.0, norm_std=list(std)).predict(at_zero).detach().numpy()
    unperturbed = torch.softmax(dead(at_zero) / 10.0, dim=1).max(dim=1).values.detach().numpy()
    np.testing.assert_allclose(theirs_dead, unperturbed, rtol=1e-6)  # sign(0) = 0: theirs leaves x alone
    assert not np.allclose(ours_dead, unperturbed, rtol=1e-6, atol=0)  # sign(0) = +1: ours moves every pixel
