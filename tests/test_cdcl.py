"""CDCL (SPEC §3.3): Eq. 12 against a double-loop reference, the β̂ pull, negatives-only rows, stability."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from hrp_ood.method import cdcl_loss, normalize_beta


def reference_cdcl(z, pseudo, beta_hat, confident, tau, skip_pull_of=()):
    """Eq. 12 with explicit loops over anchors a and positives p; rows i and n+i share sample i's fields.

    Pairs touching a sample in ``skip_pull_of`` are left out of the numerator sum but still counted in |P(a)|.
    """
    rows, n = z.shape[0], z.shape[0] // 2
    sample = [r % n for r in range(rows)]
    total, anchors = 0.0, 0
    for a in range(rows):
        sa = sample[a]
        positives = [
            p
            for p in range(rows)
            if p != a and confident[sa] and confident[sample[p]] and pseudo[sample[p]] == pseudo[sa]
        ]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[a] @ z[k]) / tau) for k in range(rows) if k != a)
        pulled = 0.0
        for p in positives:
            if sa in skip_pull_of or sample[p] in skip_pull_of:
                continue
            weight = float(beta_hat[sa] * beta_hat[sample[p]])
            pulled += weight * (float(z[a] @ z[p]) / tau - math.log(denominator))
        total += pulled / len(positives)
        anchors += 1
    return -total / anchors


def _random_case(seed=0, n=6, d=5):
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(2 * n, d, generator=gen, dtype=torch.float64), dim=1)
    pseudo = torch.randint(3, (n,), generator=gen)
    beta_hat = torch.rand(n, generator=gen, dtype=torch.float64)
    confident = torch.rand(n, generator=gen) < 0.7
    confident[:2] = True
    pseudo[:2] = 0  # at least two confident samples that agree: A is not empty
    return z, pseudo, beta_hat, confident


def test_matches_double_loop_reference():
    for seed in range(3):
        z, pseudo, beta_hat, confident = _random_case(seed)
        for tau in (0.1, 0.5):
            got = cdcl_loss(z, pseudo, beta_hat, confident, tau).item()
            assert abs(got - reference_cdcl(z, pseudo, beta_hat, confident, tau)) < 1e-10


def test_zero_beta_removes_the_pull_but_keeps_the_count():
    z, pseudo, beta_hat, confident = _random_case(seed=4)
    weights = torch.ones_like(beta_hat)
    weights[1] = 0.0
    got = cdcl_loss(z, pseudo, weights, confident, 0.1).item()
    assert abs(got - reference_cdcl(z, pseudo, torch.ones_like(beta_hat), confident, 0.1, skip_pull_of={1})) < 1e-10
    # The gradient is that of the pull-free loss too: along a move of sample 1's two rows, it matches a
    # central finite difference of the reference with sample 1's pulls removed (only denominators remain).
    z_leaf = z.clone().requires_grad_(True)
    cdcl_loss(z_leaf, pseudo, weights, confident, 0.1).backward()
    n = z.shape[0] // 2
    direction = torch.zeros_like(z)
    direction[[1, n + 1]] = torch.randn(2, z.shape[1], generator=torch.Generator().manual_seed(0), dtype=z.dtype)
    h = 1e-6

    def pull_free(z_moved):
        return reference_cdcl(z_moved, pseudo, weights, confident, 0.1, skip_pull_of={1})

    finite_difference = (pull_free(z + h * direction) - pull_free(z - h * direction)) / (2 * h)
    assert abs((z_leaf.grad * direction).sum().item() - finite_difference) < 1e-6


def test_positives_come_from_pseudo_labels_only_and_unconfident_rows_are_negatives():
    assert "noisy_labels" not in inspect.signature(cdcl_loss).parameters
    z, pseudo, beta_hat, confident = _random_case(seed=5)
    confident[3] = False
    base = cdcl_loss(z, pseudo, beta_hat, confident, 0.1)
    relabelled = pseudo.clone()
    relabelled[3] = pseudo[0]  # an unconfident row never becomes a positive, whatever its label
    torch.testing.assert_close(cdcl_loss(z, relabelled, beta_hat, confident, 0.1), base)
    moved = z.clone()
    moved[3] = z[0]  # ... but it is a negative: moving it onto an anchor changes that anchor's denominator
    assert abs(cdcl_loss(moved, pseudo, beta_hat, confident, 0.1).item() - base.item()) > 1e-6
    assert (
        abs(
            cdcl_loss(moved, pseudo, beta_hat, confident, 0.1).item()
            - reference_cdcl(moved, pseudo, beta_hat, confident, 0.1)
        )
        < 1e-10
    )


def test_stable_for_small_temperature_and_identical_vectors():
    n = 4
    z = F.normalize(torch.ones(2 * n, 3), dim=1).requires_grad_(True)
    loss = cdcl_loss(z, torch.zeros(n, dtype=torch.long), torch.ones(n), torch.ones(n, dtype=torch.bool), tau=0.01)
    # Every other row is a positive with the same similarity: each log-probability is −log(2n − 1).
    torch.testing.assert_close(loss, torch.tensor(math.log(2 * n - 1)))
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_no_anchor_gives_a_differentiable_zero():
    z = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1).requires_grad_(True)
    loss = cdcl_loss(z, torch.tensor([0, 1, 2]), torch.ones(3), torch.ones(3, dtype=torch.bool).logical_not(), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_normalize_beta_min_max():
    torch.testing.assert_close(normalize_beta(torch.tensor([1.0, 3.0, 2.0]), delta=0.0), torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(normalize_beta(torch.full((4,), 0.7)), torch.ones(4))  # constant β: no gating
    assert torch.equal(normalize_beta(torch.zeros(4)), torch.zeros(4))  # no pseudo-label helps
