"""Consensus-Driven Contrastive Learning (CDCL) (SPEC §3.3, Eqs. 10–12).

    (10) β̂_i  = (β_i − min_k β_k) / (max_k β_k − min_k β_k + δ)          ∈ [0, 1]
    (11) w_ab = β̂_a β̂_b
    (12) L_CDCL = −(1/|A|) Σ_{a∈A} (1/|P(a)|) Σ_{p∈P(a)} w_ap log[exp(z_a·z_p/τ) / Σ_{k≠a} exp(z_a·z_k/τ)]

A supervised-contrastive loss (SupCon, Khosla et al. 2020) whose positives come from the peer's
pseudo-labels only (never the noisy labels) and whose pull is scaled by pseudo-label reliability:
dividing by |P(a)| rather than Σ w makes a low β̂ weaken the pull instead of being renormalised away.
"""

from __future__ import annotations

import torch


def normalize_beta(beta: torch.Tensor, delta: float = 1e-8) -> torch.Tensor:
    """Min-max normalise β over the batch to [0, 1] (Eq. 10)."""
    beta = beta.detach()
    low, high = beta.min(), beta.max()
    return (beta - low) / (high - low + delta)


def cdcl_loss(z: torch.Tensor, pseudo_labels: torch.Tensor, beta_hat: torch.Tensor, confident: torch.Tensor,
              tau: float = 0.1) -> torch.Tensor:
    """Reliability-weighted supervised contrastive loss over two views (Eq. 12).

    z: (2n, d) L2-normalised embeddings, rows [weak views; strong views]; rows i and n+i share the
    sample's pseudo-label, β̂ and confidence flag (each (n,)). Positives of anchor a:
    P(a) = {p ≠ a : ŷ_p = ŷ_a, a and p both confident}; unconfident rows are only negatives (they
    stay in every denominator). A = anchors with at least one positive; the loss is a zero that
    still depends on ``z`` when A is empty.
    """
    rows = z.shape[0]
    labels = pseudo_labels.repeat(2)
    weights = beta_hat.detach().to(z.dtype).repeat(2)
    confident = confident.repeat(2)

    not_self = ~torch.eye(rows, dtype=torch.bool, device=z.device)
    positive = (labels[:, None] == labels[None, :]) & confident[:, None] & confident[None, :] & not_self

    similarity = z @ z.T / tau
    similarity = similarity - similarity.max(dim=1, keepdim=True).values.detach()
    log_denominator = torch.logsumexp(similarity.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    # Non-positive entries (the diagonal among them) are zeroed before the product, never -inf · 0.
    log_prob = torch.where(positive, similarity - log_denominator, torch.zeros_like(similarity))

    pair_weight = weights[:, None] * weights[None, :]
    num_positives = positive.sum(dim=1)
    per_anchor = (pair_weight * log_prob).sum(dim=1) / num_positives.clamp_min(1)
    # Rows without positives contribute exactly 0 above, so summing over all rows and dividing by |A|
    # averages over A without a host sync (and gives a graph-connected 0 when A is empty).
    num_anchors = (num_positives > 0).sum().clamp_min(1)
    return -per_anchor.sum() / num_anchors
