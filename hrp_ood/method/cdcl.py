"""Consensus-Driven Contrastive Learning (CDCL) (SPEC §3.3, Eqs. 10–12).

    (10) β̂_i  = (β_i − min_k β_k) / (max_k β_k − min_k β_k + δ)          ∈ [0, 1]
    (11) w_ab = β̂_a β̂_b
    (12) L_CDCL = −(1/|A|) Σ_{a∈A} (1/|P(a)|) Σ_{p∈P(a)} w_ap log[exp(z_a·z_p/τ) / Σ_{k≠a} exp(z_a·z_k/τ)]

A supervised-contrastive loss (SupCon, Khosla et al. 2020) whose positives come from the peer's
pseudo-labels only (never the noisy labels) and whose pull is scaled by pseudo-label reliability:
dividing by |P(a)| rather than Σ w makes a low β̂ weaken the pull instead of being renormalised away.

Data-parallel (`hrp_ood.distributed`, identities in one process): min/max of Eq. 10 are over every
rank's β; each rank's anchors are its own rows, contrasted against every rank's rows (embeddings
all-gathered with their gradients), and the sum over anchors is divided by the global |A| / W
(`per_rank_count`), so that DDP's gradient mean is the gradient of the one-process loss.
"""

from __future__ import annotations

import torch

from hrp_ood.distributed import all_gather, all_gather_with_grad, global_max, global_min, per_rank_count, rank


def normalize_beta(beta: torch.Tensor, delta: float = 1e-8) -> torch.Tensor:
    """Min-max normalise β over the (global) batch to [0, 1] (Eq. 10).

    A batch whose β are all equal carries no ranking: β̂ = 1 where β > 0 (no gating: the no-meta variants,
    β ≡ 1, keep CDCL on) and 0 where β = 0 (no pseudo-label helps), instead of Eq. 10's 0/δ = 0 for every row.
    """
    beta = beta.detach()
    low, high = global_min(beta.min()), global_max(beta.max())
    spread = (beta - low) / (high - low + delta)
    return torch.where(high > low, spread, (beta > 0).to(beta.dtype))


def cdcl_loss(
    z: torch.Tensor, pseudo_labels: torch.Tensor, beta_hat: torch.Tensor, confident: torch.Tensor, tau: float = 0.1
) -> torch.Tensor:
    """Reliability-weighted supervised contrastive loss over two views (Eq. 12).

    z: (2n, d) L2-normalised embeddings, rows [weak views; strong views]; rows i and n+i share the
    sample's pseudo-label, β̂ and confidence flag (each (n,)). Positives of anchor a:
    P(a) = {p ≠ a : ŷ_p = ŷ_a, a and p both confident}; unconfident rows are only negatives (they
    stay in every denominator). A = anchors with at least one positive; the loss is a zero that
    still depends on ``z`` when A is empty.

    Data-parallel: the local rows are the anchors, the columns are every rank's rows (rank order).
    """
    rows = z.shape[0]
    labels = pseudo_labels.repeat(2)
    weights = beta_hat.detach().to(z.dtype).repeat(2)
    confident = confident.repeat(2)
    all_z = all_gather_with_grad(z)
    all_labels, all_weights, all_confident = all_gather(labels), all_gather(weights), all_gather(confident)

    own_column = rank() * rows + torch.arange(rows, device=z.device)
    not_self = own_column[:, None] != torch.arange(all_z.shape[0], device=z.device)[None, :]
    positive = (labels[:, None] == all_labels[None, :]) & confident[:, None] & all_confident[None, :] & not_self

    similarity = z @ all_z.T / tau
    similarity = similarity - similarity.max(dim=1, keepdim=True).values.detach()
    log_denominator = torch.logsumexp(similarity.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    # Non-positive entries (the diagonal among them) are zeroed before the product, never -inf · 0.
    log_prob = torch.where(positive, similarity - log_denominator, torch.zeros_like(similarity))

    pair_weight = weights[:, None] * all_weights[None, :]
    num_positives = positive.sum(dim=1)
    per_anchor = (pair_weight * log_prob).sum(dim=1) / num_positives.clamp_min(1)
    # Rows without positives contribute exactly 0 above, so summing over all rows and dividing by |A|
    # averages over A without a host sync (and gives a graph-connected 0 when A is empty).
    num_anchors = per_rank_count((num_positives > 0).sum())
    return -per_anchor.sum() / num_anchors
