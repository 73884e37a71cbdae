"""RAM and GRG (SPEC §3.2): Beta parameters, the limiting cases of λ's law, mixing and the gated loss."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from hrp_ood.errors import UserError
from hrp_ood.method import ram_beta_params, ram_loss, reliability_mixup, total_reliability

KAPPA = 4.0
SAMPLES = 40_000  # λ draws per law


def _mix(T: torch.Tensor, seed: int = 0, **kwargs):
    """Mixup of scalar inputs x_i = i with one-hot targets, under a local seed (the API uses the global RNG)."""
    n = T.shape[0]
    inputs = torch.arange(n, dtype=torch.float64)[:, None]
    targets = torch.eye(4, dtype=torch.float64)[torch.arange(n) % 4]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return inputs, targets, reliability_mixup(inputs, targets, T, KAPPA, **kwargs)


def _assert_beta_moments(lam: torch.Tensor, a: float, b: float):
    """Sample mean and variance within 5 standard errors of Beta(a, b)'s (SE of s² = σ²√((κ_excess + 2)/N))."""
    mean, var, excess_kurtosis = (float(v) for v in stats.beta.stats(a, b, moments="mvk"))
    lam, count = lam.double(), len(lam)
    assert abs(lam.mean().item() - mean) < 5 * (var / count) ** 0.5
    assert abs(lam.var().item() - var) < 5 * var * ((excess_kurtosis + 2) / count) ** 0.5


def test_total_reliability_clips():
    T = total_reliability(torch.tensor([0.0, 1.0, 5.0, 0.02]), torch.tensor([0.0, 0.5, 1.0, 0.03]))
    torch.testing.assert_close(T, torch.tensor([0.1, 1.5, 3.0, 0.1]))
    with pytest.raises(UserError, match="t_min"):
        total_reliability(torch.ones(2), torch.ones(2), t_min=0.0)


def test_beta_params_known_values():
    a, b = ram_beta_params(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0]), kappa=4.0, eps=0.0)
    torch.testing.assert_close(a, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(b, torch.tensor([3.0, 2.0]))
    a, b = ram_beta_params(torch.tensor([1.0, 0.1]), torch.tensor([3.0, 2.0]), kappa=4.0, symmetric=True)
    assert torch.equal(a, torch.full((2,), 4.0)) and torch.equal(b, torch.full((2,), 4.0))


def test_equal_reliability_gives_beta_half_kappa():
    _, _, mixed = _mix(torch.full((SAMPLES,), 1.3))
    _assert_beta_moments(mixed.lam, KAPPA / 2, KAPPA / 2)
    # More endpoint-heavy than standard Mixup's Beta(κ, κ), and no λ ← max(λ, 1−λ) folding.
    assert mixed.lam.var().item() > 1.5 * stats.beta(KAPPA, KAPPA).var()
    assert abs((mixed.lam < 0.5).float().mean().item() - 0.5) < 0.02


def test_reliable_sample_dominates_the_mix():
    n = SAMPLES
    T = torch.where(torch.arange(n) % 2 == 0, torch.tensor(3.0), torch.tensor(0.1))
    _, _, mixed = _mix(T)
    high_low = (T == 3.0) & (T[mixed.perm] == 0.1)
    low_high = (T == 0.1) & (T[mixed.perm] == 3.0)
    _assert_beta_moments(mixed.lam[high_low], KAPPA * 3.0 / 3.1, KAPPA * 0.1 / 3.1)
    _assert_beta_moments(mixed.lam[low_high], KAPPA * 0.1 / 3.1, KAPPA * 3.0 / 3.1)
    assert mixed.lam[high_low].mean() > 0.95 and mixed.lam[low_high].mean() < 0.05


def test_both_unreliable_is_defined_and_gate_is_small():
    _, _, mixed = _mix(torch.full((SAMPLES,), 0.1))
    assert torch.isfinite(mixed.lam).all() and ((mixed.lam >= 0) & (mixed.lam <= 1)).all()
    _assert_beta_moments(mixed.lam, KAPPA / 2, KAPPA / 2)
    torch.testing.assert_close(mixed.gate, torch.full((SAMPLES,), 0.1))


def test_symmetric_ablation_is_beta_kappa_kappa():
    T = torch.where(torch.arange(SAMPLES) % 2 == 0, torch.tensor(3.0), torch.tensor(0.1))
    _, _, mixed = _mix(T, symmetric=True)
    _assert_beta_moments(mixed.lam, KAPPA, KAPPA)


def test_mixed_inputs_targets_and_gate_follow_eqs_7_8():
    T = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 0.7])
    inputs, targets, mixed = _mix(T, seed=3)
    lam, perm = mixed.lam.double(), mixed.perm
    assert sorted(perm.tolist()) == list(range(6))
    torch.testing.assert_close(mixed.inputs, lam[:, None] * inputs + (1 - lam[:, None]) * inputs[perm])
    torch.testing.assert_close(mixed.targets, lam[:, None] * targets + (1 - lam[:, None]) * targets[perm])
    torch.testing.assert_close(mixed.targets.sum(dim=1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(mixed.gate, mixed.lam * T + (1 - mixed.lam) * T[perm])
    _, _, ungated = _mix(T, seed=3, gated=False)
    assert torch.equal(ungated.gate, torch.ones(6)) and torch.equal(ungated.lam, mixed.lam)


def test_image_inputs_broadcast_lambda():
    images = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        mixed = reliability_mixup(images, torch.eye(5), torch.ones(5), KAPPA)
    lam = mixed.lam.view(5, 1, 1, 1)
    torch.testing.assert_close(mixed.inputs, lam * images + (1 - lam) * images[mixed.perm])


def test_ram_loss_known_value_and_division_by_n():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])
    gate = torch.tensor([1.5, 0.2], requires_grad=True)
    log_p = logits.detach().log_softmax(dim=1)
    manual = (1.5 * -(0.7 * log_p[0, 0] + 0.3 * log_p[0, 1]) + 0.2 * -(0.5 * log_p[1, 1] + 0.5 * log_p[1, 2])) / 2
    loss = ram_loss(logits, targets, gate)
    torch.testing.assert_close(loss, manual)
    torch.testing.assert_close(ram_loss(logits, targets, gate / 2), manual / 2)  # not renormalised by Σg
    loss.backward()
    assert gate.grad is None and logits.grad is not None and logits.grad.abs().sum() > 0
