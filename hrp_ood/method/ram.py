"""Reliability-Arbitrated Mixup (RAM) and Global Reliability Gating (GRG) (SPEC §3.2, Eqs. 6–9).

    (6) T_i  = clip(α_i + β_i, T_min, T_max)
    (7) λ_ij ~ Beta(κ T_i/(T_i+T_j+ε), κ T_j/(T_i+T_j+ε)),   j = π(i)
        x̃ = λ x_i + (1−λ) x_j,   ỹ = λ y*_i + (1−λ) y*_j
    (8) g_ij = λ T_i + (1−λ) T_j
    (9) L_RAM = (1/n) Σ_i g_ij H(ỹ_i, p_θ(x̃_i))

The Beta parameters sum to κ, so E[λ] = T_i/(T_i+T_j): equal reliabilities give Beta(κ/2, κ/2)
(balanced, more endpoint-heavy than standard Mixup's Beta(κ, κ)); T_i ≫ T_j pushes λ to 1 so the
mix stays near the reliable sample. DivideMix's λ ← max(λ, 1−λ) is deliberately *not* applied:
it would erase that asymmetry.

Data-parallel: each rank mixes pairs within its own slice of the batch (π permutes the local rows),
and the local mean of Eq. 9 is W × the rank's share of the global mean (`hrp_ood.distributed`), so DDP's
gradient mean equals one process mixing the same pairs with the same λ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hrp_ood.errors import UserError
from hrp_ood.method.targets import soft_cross_entropy


def total_reliability(alpha: torch.Tensor, beta: torch.Tensor, t_min: float = 0.1, t_max: float = 3.0) -> torch.Tensor:
    """T_i = clip(α_i + β_i, T_min, T_max) (Eq. 6).

    T_min must be positive: it keeps both Beta concentrations of Eq. 7 strictly positive.
    """
    if not 0 < t_min <= t_max:
        raise UserError(f"reliability clip range must satisfy 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    return (alpha + beta).clamp(t_min, t_max)


def ram_beta_params(
    t_i: torch.Tensor, t_j: torch.Tensor, kappa: float = 4.0, eps: float = 1e-8, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beta concentrations (a, b) of λ for each pair (Eq. 7): a = κ T_i/(T_i+T_j+ε), b = κ T_j/(T_i+T_j+ε).

    ``symmetric=True`` is the symmetric-RAM ablation: (κ, κ) for every pair, as in standard Mixup.
    """
    if symmetric:
        full = torch.full_like(t_i, kappa)
        return full, full.clone()
    denominator = t_i + t_j + eps
    return kappa * t_i / denominator, kappa * t_j / denominator


@dataclass
class MixedBatch:
    """A RAM-mixed batch: inputs (n, ...), soft targets (n, C), and per-pair λ, gate g (Eq. 8), partner π (n,)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lam: torch.Tensor
    gate: torch.Tensor
    perm: torch.Tensor


def reliability_mixup(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    T: torch.Tensor,
    kappa: float = 4.0,
    *,
    symmetric: bool = False,
    gated: bool = True,
    eps: float = 1e-8,
    perm: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
) -> MixedBatch:
    """Mix each sample i with a random partner j = π(i), λ drawn from its reliability-arbitrated Beta (Eqs. 7–8).

    ``targets`` are soft targets (n, C) (one-hot rows for hard labels); ``T`` is the total reliability
    (Eq. 6). ``gated=False`` is the RAM-without-GRG ablation (g ≡ 1). Randomness (π and λ) comes from
    torch's global RNG on the inputs' device, like any other augmentation in the training loop, unless
    ``perm`` (n,) and/or ``lam`` (n,) are given (to replay a draw, e.g. across processes).
    """
    n = inputs.shape[0]
    if perm is None:
        perm = torch.randperm(n, device=inputs.device)
    T = T.detach().to(device=inputs.device, dtype=torch.promote_types(T.dtype, torch.float32))
    t_i, t_j = T, T[perm]
    if lam is None:
        a, b = ram_beta_params(t_i, t_j, kappa, eps, symmetric)
        lam = torch.distributions.Beta(a, b, validate_args=False).sample()  # no host sync
    lam = lam.to(device=inputs.device, dtype=T.dtype)

    lam_x = lam.to(inputs.dtype).view(n, *([1] * (inputs.dim() - 1)))
    mixed_inputs = lam_x * inputs + (1 - lam_x) * inputs[perm]
    lam_y = lam.to(targets.dtype)[:, None]
    mixed_targets = lam_y * targets + (1 - lam_y) * targets[perm]
    gate = lam * t_i + (1 - lam) * t_j if gated else torch.ones_like(lam)
    return MixedBatch(inputs=mixed_inputs, targets=mixed_targets, lam=lam, gate=gate, perm=perm)


def ram_loss(logits: torch.Tensor, mixed_targets: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """L_RAM = (1/n) Σ_i g_i H(ỹ_i, softmax(logits_i)) (Eq. 9), g detached.

    Divided by n, not by Σ g: weakly reliable pairs lose mass instead of being renormalised.
    """
    return (gate.detach() * soft_cross_entropy(logits, mixed_targets)).mean()
