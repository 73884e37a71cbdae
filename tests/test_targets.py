"""Refined targets, Eqs. 13–14, GCE, co-teaching selection and the schedules, against hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hrp_ood.errors import UserError
from hrp_ood.method import (
    consistency_loss,
    coteaching_forget_rate,
    coteaching_select,
    gce_loss,
    ramp_weight,
    refine_targets,
    reweighted_ce,
    soft_cross_entropy,
    weighted_label_ce,
)


def test_refine_targets_rules_in_order():
    probs = torch.tensor(
        [
            [0.60, 0.30, 0.10],  # argmax = ỹ = 0                  → endorsed, one-hot 0
            [0.45, 0.35, 0.20],  # ỹ = 1, p[ỹ] = 0.35 ≥ τ_match=0.3 → endorsed, one-hot 1
            [0.97, 0.02, 0.01],  # ỹ = 2, peer confident           → one-hot 0
            [0.50, 0.10, 0.40],  # ỹ = 1, neither                   → sharpened p
        ]
    )
    noisy = torch.tensor([0, 1, 2, 1])
    targets, high_conf = refine_targets(probs, noisy, tau_match=0.3, tau_conf=0.95, sharpen_temperature=0.5)
    assert high_conf.tolist() == [True, True, True, False]
    torch.testing.assert_close(targets[:3], torch.eye(3)[[0, 1, 0]])
    squared = torch.tensor([0.25, 0.01, 0.16])
    torch.testing.assert_close(targets[3], squared / squared.sum())


def test_refine_targets_sharpening_survives_tiny_temperature():
    targets, _ = refine_targets(
        torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([1]), tau_match=0.9, tau_conf=0.99, sharpen_temperature=0.01
    )
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.0, 0.0]]))


def test_soft_cross_entropy_matches_torch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=gen)
    soft = torch.rand(5, 4, generator=gen).softmax(dim=1)
    torch.testing.assert_close(soft_cross_entropy(logits, soft), F.cross_entropy(logits, soft, reduction="none"))


def test_reweighted_ce_matches_loop_reference():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.eye(3, dtype=torch.float64)[torch.randint(3, (6,), generator=gen)]
    T = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1, 1.5], dtype=torch.float64, requires_grad=True)
    high_conf = torch.tensor([True, False, True, True, False, True])
    gamma = 0.5
    members = [i for i in range(6) if high_conf[i]]
    mean_T = sum(T[i].item() for i in members) / len(members)
    expected = sum(
        (1 + gamma * (T[i].item() / mean_T - 1)) * -(targets[i] * logits[i].detach().log_softmax(0)).sum().item()
        for i in members
    ) / len(members)
    loss = reweighted_ce(logits, targets, T, high_conf, gamma)
    assert abs(loss.item() - expected) < 1e-12
    loss.backward()
    assert T.grad is None and logits.grad[~high_conf].abs().sum() == 0
    # γ = 0 is plain CE over S.
    plain = F.cross_entropy(logits[high_conf], targets[high_conf])
    torch.testing.assert_close(reweighted_ce(logits, targets, T, high_conf, 0.0), plain)


def test_reweighted_ce_empty_set_is_differentiable_zero():
    logits = torch.randn(3, 2, requires_grad=True)
    loss = reweighted_ce(logits, torch.full((3, 2), 0.5), torch.ones(3), torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_consistency_loss_is_kl_weak_to_strong_with_stopgrad():
    gen = torch.Generator().manual_seed(2)
    weak = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    strong = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    p_w, p_s = weak.detach().softmax(1), strong.detach().softmax(1)
    expected = sum((p_w[i] * (p_w[i].log() - p_s[i].log())).sum().item() for i in range(4)) / 4
    loss = consistency_loss(weak, strong)
    assert abs(loss.item() - expected) < 1e-12
    loss.backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0
    assert consistency_loss(strong, strong).item() == pytest.approx(0.0, abs=1e-12)


def test_gce_known_values():
    # Uniform prediction over C classes: p_y = 1/C, loss = (1 − C^−q)/q.
    assert gce_loss(torch.zeros(3, 4), torch.tensor([0, 1, 3]), q=0.7).item() == pytest.approx((1 - 4**-0.7) / 0.7)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = logits.softmax(1)
    expected = ((1 - p[0, 0] ** 0.5) / 0.5 + (1 - p[1, 0] ** 0.5) / 0.5) / 2
    assert gce_loss(logits, torch.tensor([0, 0]), q=0.5).item() == pytest.approx(expected.item(), rel=1e-12)
    # q = 1 is the MAE-like limit: mean(1 − p_y).
    assert gce_loss(logits, torch.tensor([0, 0]), q=1.0).item() == pytest.approx((2 - p[0, 0] - p[1, 0]).item() / 2)
    with pytest.raises(UserError, match="q"):
        gce_loss(logits, torch.tensor([0, 0]), q=0.0)


def test_coteaching_select_uses_the_peer_ranking():
    loss_a = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    loss_b = torch.tensor([0.8, 0.2, 0.4, 0.6, 0.1])
    keep_for_a, keep_for_b = coteaching_select(loss_a, loss_b, forget_rate=0.4)
    assert sorted(keep_for_a.tolist()) == [1, 2, 4]  # three smallest of loss_b
    assert sorted(keep_for_b.tolist()) == [0, 2, 3]  # three smallest of loss_a
    keep_all, _ = coteaching_select(loss_a, loss_b, forget_rate=0.0)
    assert sorted(keep_all.tolist()) == list(range(5))
    keep_one, _ = coteaching_select(loss_a, loss_b, forget_rate=0.9)
    assert keep_one.tolist() == [4]  # ⌊0.1·5⌋ = 0 is raised to one sample
    with pytest.raises(UserError, match="forget rate"):
        coteaching_select(loss_a, loss_b, forget_rate=1.0)


def test_ramp_weight_schedule():
    assert ramp_weight(0, 10, 16) == 0.0
    assert ramp_weight(9.99, 10, 16) == 0.0
    assert ramp_weight(10, 10, 16) == 0.0
    assert ramp_weight(18, 10, 16) == pytest.approx(0.5)
    assert ramp_weight(26, 10, 16) == 1.0 and ramp_weight(300, 10, 16) == 1.0
    assert ramp_weight(10, 10, 0) == 1.0


def test_coteaching_forget_rate_schedule():
    assert coteaching_forget_rate(0, 0.5, 10) == 0.0
    assert coteaching_forget_rate(2.5, 0.5, 10) == pytest.approx(0.125)
    assert coteaching_forget_rate(10, 0.5, 10) == 0.5 and coteaching_forget_rate(50, 0.5, 10) == 0.5
    assert coteaching_forget_rate(3, 0.2, 0) == 0.2
    assert math.isclose(coteaching_forget_rate(5, 0.8), 0.4)


def test_prior_penalty_is_kl_from_uniform_to_the_mean_prediction():
    from scipy.stats import entropy

    from hrp_ood.method import prior_penalty

    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mean_probs = logits.softmax(dim=1).mean(dim=0).numpy()
    expected = entropy(np.full(5, 0.2), mean_probs)  # KL(uniform ‖ p̄)
    assert prior_penalty(logits).item() == pytest.approx(expected, rel=1e-12)
    balanced = torch.eye(5, dtype=torch.float64).repeat(2, 1) * 4.0  # every class predicted equally often
    assert prior_penalty(balanced).item() == pytest.approx(0.0, abs=1e-12)
    collapsed = torch.zeros(10, 5, dtype=torch.float64)
    collapsed[:, 0] = 8.0
    assert prior_penalty(collapsed).item() > 1.0
    logits.requires_grad_(True)
    prior_penalty(logits).backward()
    assert torch.isfinite(logits.grad).all()


def test_prior_penalty_stays_finite_when_a_class_underflows():
    from hrp_ood.method import prior_penalty

    """A class every sample gives probability exp(-200) (0 in float32) has a finite, large penalty: log p̄ is taken
    through logsumexp, not log(mean softmax) (which went non-finite in bf16 runs on a GPU)."""
    logits = torch.tensor([[0.0, 0.0, -200.0], [0.0, 1.0, -200.0]])
    penalty = prior_penalty(logits)
    assert torch.isfinite(penalty) and penalty.item() > 60
    expected = (
        torch.full((3,), 1 / 3, dtype=torch.float64)
        * (
            torch.log(torch.tensor(1 / 3, dtype=torch.float64))
            - torch.logsumexp(logits.double().log_softmax(1), 0)
            + math.log(2)
        )
    ).sum()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


def test_balanced_s_gives_every_target_class_of_s_the_same_total_weight():
    """Brute force: with γ = 0 and balanced S, L_CE = (1/|S|) Σ_i∈S |S| / (K n_ci) H_i, i.e. the mean over the
    K classes present of each class's mean CE; rows outside S count for nothing."""
    from hrp_ood.method.targets import reweighted_ce, soft_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(9, 3, dtype=torch.float64)
    classes = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    targets = torch.nn.functional.one_hot(classes, 3).to(torch.float64)
    high_conf = torch.tensor([True, True, True, True, True, False, False, False, True])
    ce = soft_cross_entropy(logits, targets)
    per_class = [ce[(classes == k) & high_conf].mean() for k in range(3)]  # S holds 4 of class 0, 1 of 1, 1 of 2
    expected = sum(per_class) / 3
    T = torch.ones(9, dtype=torch.float64)
    assert torch.allclose(reweighted_ce(logits, targets, T, high_conf, gamma=0.0, balanced=True), expected)
    assert not torch.allclose(reweighted_ce(logits, targets, T, high_conf, gamma=0.0), expected)


def test_weighted_label_ce_matches_a_loop_over_log_probabilities():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    noisy, pseudo = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    w_noisy, w_pseudo = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    expected = 0.0
    for z, y, y_hat, a, b in zip(logits.tolist(), noisy.tolist(), pseudo.tolist(), w_noisy.tolist(), w_pseudo.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in z))
        expected += a * (log_norm - z[y]) + b * (log_norm - z[y_hat])
    got = weighted_label_ce(logits, noisy, pseudo, w_noisy, w_pseudo)
    assert got.item() == pytest.approx(expected / 6, rel=1e-12)
