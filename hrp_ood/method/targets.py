"""Refined targets and the per-network losses of HRP (SPEC §3.4, Eqs. 13–14), plus baseline losses.

Baselines: generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018) and the small-loss sample
exchange of co-teaching (Han et al., NeurIPS 2018).

Data-parallel (`hrp_ood.distributed`, identities in one process): every rank holds an equal share of
the batch, so a per-sample mean over the local rows is already W × the rank's share of the global mean
and DDP's gradient mean gives the one-process gradient (Eq. 14, GCE, plain CE). Means over a
data-dependent set (S of Eq. 13) divide by the global |S| / W instead, mean_S T is global, and the
batch-mean prediction of the prior penalty is averaged over ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hrp_ood.distributed import global_sum, per_rank_count, world_size
from hrp_ood.errors import UserError


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) / Σ_c p_c^(1/T) row-wise, computed in log space so small T cannot underflow to 0/0."""
    return torch.softmax(probs.clamp_min(torch.finfo(probs.dtype).tiny).log() / temperature, dim=1)


def refine_targets(
    peer_probs: torch.Tensor,
    noisy_labels: torch.Tensor,
    tau_match: float = 0.5,
    tau_conf: float = 0.95,
    sharpen_temperature: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined targets y* from the peer's weak-view probabilities p̄ (ProMix-style, SPEC §3.4).

    Row by row, first rule that applies:
      1. label endorsed (argmax p̄_i = ỹ_i, or p̄_i[ỹ_i] ≥ τ_match)  → one-hot ỹ_i
      2. peer confident (max p̄_i ≥ τ_conf)                          → one-hot argmax p̄_i
      3. otherwise                                                    → sharpen(p̄_i, T)
    Returns (targets (n, C), high_conf (n,) bool) where high_conf marks rules 1–2 (the set S of Eq. 13).
    """
    peer_probs = peer_probs.detach()
    num_classes = peer_probs.shape[1]
    confidence, prediction = peer_probs.max(dim=1)
    label_prob = peer_probs.gather(1, noisy_labels[:, None]).squeeze(1)
    endorsed = (prediction == noisy_labels) | (label_prob >= tau_match)
    confident = ~endorsed & (confidence >= tau_conf)

    hard_label = torch.where(endorsed, noisy_labels, prediction)
    one_hot = F.one_hot(hard_label, num_classes).to(peer_probs.dtype)
    high_conf = endorsed | confident
    targets = torch.where(high_conf[:, None], one_hot, sharpen(peer_probs, sharpen_temperature))
    return targets, high_conf


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Per-sample H(y, softmax(logits)) = −Σ_c y_c log p_c, shape (n,)."""
    return -(soft_targets * logits.log_softmax(dim=1)).sum(dim=1)


def reweighted_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    T: torch.Tensor,
    high_conf: torch.Tensor,
    gamma: float = 0.5,
    balanced: bool = False,
) -> torch.Tensor:
    """Reliability-reweighted CE on the high-confidence set S (Eq. 13).

        L_CE = (1/|S|) Σ_{i∈S} [1 + γ (T_i / mean_S T − 1)] H(y*_i, p_θ(x^weak_i))

    The weights are detached (they have mean 1 over S, so γ only redistributes mass). Returns a
    zero that still depends on ``logits`` when S is empty. Data-parallel: S, |S| and mean_S T are
    global, and the local sum is divided by |S| / W (see `hrp_ood.distributed`).

    ``balanced`` (config ``balanced_s``, not in SPEC): each sample's weight is also multiplied by
    |S| / (K n_k), n_k the members of S whose target's argmax is class k and K the classes present in S, so
    every class present carries the same total weight (the multipliers have mean 1 over S).
    """
    ce = soft_cross_entropy(logits, targets)
    mask = high_conf.to(ce.dtype)
    count = mask.sum()
    T = T.detach().to(ce.dtype)
    mean_T = global_sum((T * mask).sum()) / global_sum(count).clamp_min(1)
    weights = 1 + gamma * (T / mean_T.clamp_min(torch.finfo(ce.dtype).tiny) - 1)
    if balanced:
        weights = weights * class_balance(targets.argmax(dim=1), mask, targets.shape[1])
    return (weights * ce * mask).sum() / per_rank_count(count)


def weighted_label_ce(
    logits: torch.Tensor,
    noisy_labels: torch.Tensor,
    pseudo_labels: torch.Tensor,
    weight_noisy: torch.Tensor,
    weight_pseudo: torch.Tensor,
    over: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 1's weighted cross-entropy of the given and the pseudo-label,

        (1/n) Σ_i [w^α_i ℓ(z_i, ỹ_i) + w^β_i ℓ(z_i, ŷ_i)],

    with the perturbations ε (the meta step's inner loss) or the meta-learned α, β (config
    ``ce_loss=meta_weighted``: L2B's training loss, Zhou et al. 2024) as the weights. With ``over`` (a row mask,
    ``ce_loss=meta_weighted_s``: S) the sum is divided by the mask's count instead of n, global over ranks as in
    Eq. 13; the weights are expected to be zero outside it.
    """
    per_sample = weight_noisy * F.cross_entropy(
        logits, noisy_labels, reduction="none"
    ) + weight_pseudo * F.cross_entropy(logits, pseudo_labels, reduction="none")
    if over is None:
        return per_sample.mean()
    return per_sample.sum() / per_rank_count(over.to(per_sample.dtype).sum())


def class_balance(classes: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """|S| / (K n_{c_i}) for every row (S = rows where mask is 1; global over ranks); 0 outside S."""
    counts = global_sum(torch.zeros(num_classes, dtype=mask.dtype, device=mask.device).index_add_(0, classes, mask))
    present = (counts > 0).sum().clamp_min(1)
    return mask * counts.sum() / (present * counts[classes].clamp_min(1))


def consistency_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor) -> torch.Tensor:
    """L_cons = (1/n) Σ_i KL(stopgrad p(x^weak_i) ‖ p(x^strong_i)) (Eq. 14)."""
    log_p_weak = logits_weak.detach().log_softmax(dim=1)
    log_p_strong = logits_strong.log_softmax(dim=1)
    return F.kl_div(log_p_strong, log_p_weak, reduction="batchmean", log_target=True)


def prior_penalty(logits: torch.Tensor) -> torch.Tensor:
    """KL(π ‖ p̄) with π uniform and p̄ = mean_i softmax(z_i): DivideMix's (Li et al. 2020, Eq. 12) guard against
    every sample being assigned to a few classes.

    Not in SPEC §3 (an addition, config key ``lambda_prior``): without it the refined targets' "peer confident"
    case fed back into both networks collapsed them onto one class (CIFAR-10 JPEG, sym50, small_cnn: 48% after
    warm-up, chance two epochs later) and onto four classes on the digits demo (39%); with it the demo
    reached 95% against 77% (and 92% for plain CE). ``ce_loss=meta_weighted`` does not collapse onto one class
    without it, but its first HRP epochs crowd into a few classes and it ends lower (docs/results.md, Earlier
    measurements).
    """
    if world_size() == 1:  # log p̄ through logsumexp: a class no sample gives any probability stays finite
        log_mean = torch.logsumexp(logits.log_softmax(dim=1), dim=0) - math.log(logits.shape[0])
    else:  # p̄ over the global batch: the mean of the ranks' means (equal local batches); each rank's loss is the
        # global value = W × its share, the convention of `hrp_ood.distributed`
        log_mean = (global_sum(logits.softmax(dim=1).mean(dim=0)) / world_size()).log()
    prior = torch.full_like(log_mean, 1.0 / log_mean.numel())
    return (prior * (prior.log() - log_mean)).sum()


def gce_loss(logits: torch.Tensor, labels: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """Generalized cross-entropy (Zhang & Sabuncu 2018): mean_i (1 − p_{i,y_i}^q) / q, 0 < q ≤ 1."""
    if not 0 < q <= 1:
        raise UserError(f"GCE exponent q must be in (0, 1], got {q}")
    log_p_label = logits.log_softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    return ((1 - torch.exp(q * log_p_label)) / q).mean()


def coteaching_select(
    loss_a: torch.Tensor, loss_b: torch.Tensor, forget_rate: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Co-teaching's exchange (Han et al. 2018): each network keeps the small-loss samples its *peer* picks.

    Keeps ⌊(1 − forget_rate)·n⌋ samples (at least one). Returns index tensors
    (keep_for_a, keep_for_b): keep_for_a = the samples with the smallest ``loss_b``, and vice versa.
    """
    if not 0 <= forget_rate < 1:
        raise UserError(f"co-teaching forget rate must be in [0, 1), got {forget_rate}")
    n = loss_a.shape[0]
    keep = max(1, math.floor((1 - forget_rate) * n + 1e-9))
    keep_for_a = torch.argsort(loss_b.detach(), stable=True)[:keep]
    keep_for_b = torch.argsort(loss_a.detach(), stable=True)[:keep]
    return keep_for_a, keep_for_b
