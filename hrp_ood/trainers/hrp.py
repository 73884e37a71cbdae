"""HRP (SPEC §3) and its ablations: forward, meta step, exchange, Eq. 15, update; the method's diagnostics."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from hrp_ood.config import TrainConfig
from hrp_ood.method import (
    cdcl_loss,
    consistency_loss,
    meta_reliabilities,
    normalize_beta,
    prior_penalty,
    ram_loss,
    ramp_weight,
    refine_targets,
    reliability_mixup,
    reweighted_ce,
    total_reliability,
    weighted_label_ce,
)
from hrp_ood.method.reliability import Reliabilities
from hrp_ood.models import ProjectionHead, frozen_batchnorm_stats
from hrp_ood.trainers.base import Member, StepContext, StepInputs, loss_precision, record_loss, update
from hrp_ood.trainers.baselines import ce_step
from hrp_ood.trainers.signals import batch_auroc


def projection_head(cfg: TrainConfig, net: torch.nn.Module) -> torch.nn.Module | None:
    """CDCL's projection head (SPEC §3.3), for the methods that keep CDCL."""
    return ProjectionHead(net.num_features, cfg.proj_hidden_dim, cfg.proj_dim) if cfg.spec.cdcl else None


def _reliabilities(
    ctx: StepContext, k: int, member: Member, x_weak: torch.Tensor, batch: StepInputs, pseudo: torch.Tensor
) -> Reliabilities | None:
    """α, β of SPEC §3.1 computed on network k's parameters from the weak view and the given labels (None for
    the no-meta variants), averaged per sample across visits when the run keeps a reliability memory."""
    cfg = ctx.cfg
    if not cfg.spec.meta:
        return None
    meta_x, meta_y = ctx.sample_meta_batch()
    rel = meta_reliabilities(
        member.net,
        x_weak,
        batch.noisy_labels,
        pseudo,
        meta_x,
        meta_y,
        member.lr,
        normalization=cfg.spec.normalization,
        method=cfg.meta_method,
        delta=cfg.delta,
        calibrated=cfg.meta_calibration,
        meta_bn=cfg.meta_bn,
    )
    if ctx.memories:
        rel = ctx.memories[k].update(batch.index, rel, pseudo, cfg.spec.normalization, cfg.delta)
    return rel


def _hrp_member_loss(
    ctx: StepContext,
    member: Member,
    own: dict[str, torch.Tensor],
    peer: dict[str, torch.Tensor],
    x_weak: torch.Tensor,
    batch: StepInputs,
    weight: float,
    diagnose: bool,
) -> dict[str, torch.Tensor]:
    """Eq. 15 for one network, trained with the targets, pseudo-labels, α and β its peer computed.

    `diagnose` (net 1 only) adds the measurements of hrp_ood/trainers/signals.py: S's class histogram, RAM's λ by pair
    type and CDCL's positive-pair purity with and without the β̂ gate (these read the clean labels).
    """
    cfg, spec = ctx.cfg, ctx.cfg.spec
    noisy = batch.noisy_labels
    targets, high_conf = refine_targets(peer["probs"], noisy, cfg.tau_match, cfg.tau_conf, cfg.sharpen_temperature)
    T = total_reliability(peer["alpha"], peer["beta"], cfg.t_min, cfg.t_max)
    terms = {
        "loss_ce": _ce_term(cfg, own, peer, targets, _batch_mean_in(cfg, "ce", T, batch.epoch), high_conf, noisy),
        "loss_cons": consistency_loss(own["logits_weak"], own["logits_strong"]),
        "high_conf": high_conf.float().mean(),
        "T": T.mean(),
    }
    if diagnose and ctx.signals is not None:
        ctx.signals.count_classes("targets_S", targets.argmax(dim=1)[high_conf])
    loss = terms["loss_ce"] + cfg.lambda_cons * terms["loss_cons"]
    if cfg.lambda_prior > 0:
        terms["loss_prior"] = prior_penalty(own["logits_weak"])
        loss = loss + cfg.lambda_prior * terms["loss_prior"]
    if weight > 0 and spec.ram:
        T_ram = _batch_mean_in(cfg, "ram", T, batch.epoch)
        mixed = reliability_mixup(
            x_weak, targets, T_ram, cfg.kappa, symmetric=spec.symmetric_ram, gated=spec.grg, eps=cfg.delta
        )
        with ctx.autocast(), _running_stats_from_weak_views_only(ctx, member):
            mixed_logits = loss_precision(member.forward(mixed.inputs))
        terms["loss_ram"] = ram_loss(mixed_logits, mixed.targets, mixed.gate)
        terms["gate"] = mixed.gate.mean()
        terms["lambda"] = mixed.lam.mean()
        loss = loss + weight * terms["loss_ram"]
        if diagnose and batch.clean_labels is not None:
            terms.update(_ram_diagnostics(ctx, mixed.lam, mixed.perm, batch))
    if weight > 0 and spec.cdcl:
        z = member.head_forward(loss_precision(own["features"]))
        confident = peer["probs"].max(dim=1).values >= cfg.tau_conf
        beta_hat = _batch_mean_in(cfg, "cdcl", normalize_beta(peer["beta"], cfg.delta), batch.epoch)
        terms["loss_cdcl"] = cdcl_loss(z, peer["pseudo"], beta_hat, confident, cfg.cdcl_temperature)
        loss = loss + weight * cfg.lambda_c * terms["loss_cdcl"]
        if diagnose and batch.clean_labels is not None:
            terms.update(_cdcl_purity(peer["pseudo"], beta_hat, confident, batch.clean_labels))
    terms["loss"] = loss
    return terms


def _batch_mean_in(cfg: TrainConfig, term: str, values: torch.Tensor, epoch: float) -> torch.Tensor:
    """The paired intervention of `reliability_mean_in` (docs/results.md): in the listed term, from epoch
    `reliability_mean_from` on, every sample's reliability is the batch's mean, so the term keeps its scale but no
    longer tells one sample from another."""
    if term in cfg.reliability_mean_in and epoch >= cfg.reliability_mean_from:
        return values.mean().expand_as(values)
    return values


def _ce_term(
    cfg: TrainConfig,
    own: dict[str, torch.Tensor],
    peer: dict[str, torch.Tensor],
    targets: torch.Tensor,
    T: torch.Tensor,
    high_conf: torch.Tensor,
    noisy: torch.Tensor,
) -> torch.Tensor:
    """L_CE of Eq. 15: Eq. 13 on the peer's refined targets, or Eq. 1 weighted by meta-learned α, β (ce_loss)."""
    ce_loss = cfg.spec.ce_loss
    if ce_loss == "refined":
        return reweighted_ce(own["logits_weak"], targets, T, high_conf, cfg.gamma, balanced=cfg.balanced_s)
    if ce_loss == "meta_weighted_s":
        # S's two rules (refine_targets): the peer endorses the given label, or it is confident in another class
        endorsed = high_conf & (targets.argmax(dim=1) == noisy)
        peer_confident = high_conf & ~endorsed
        return weighted_label_ce(
            own["logits_weak"],
            noisy,
            own["pseudo"],
            own["alpha"] * endorsed,
            own["beta"] * peer_confident,
            over=high_conf,
        )
    # meta_weighted: the network's own α, β and pseudo-labels, so that its step on L_CE lowers its own meta loss
    # to first order (a weight is > 0 only where its sample's gradient agrees with the meta gradient: L2RW/L2B;
    # exact up to BN, whose training pass normalises the weak and strong views together)
    source = peer if ce_loss == "meta_weighted_peer" else own
    return weighted_label_ce(own["logits_weak"], noisy, source["pseudo"], source["alpha"], source["beta"])


def _ram_diagnostics(
    ctx: StepContext, lam: torch.Tensor, perm: torch.Tensor, batch: StepInputs
) -> dict[str, torch.Tensor]:
    """Fig. 2c: λ by pair type. ram_lambda_clean_noisy = mean weight RAM gives the clean sample of a
    clean–noisy pair (0.5: no arbitration); ram_lambda_clean_clean = mean |2λ − 1| of clean–clean pairs
    (how far from an even mix). NaN when the batch has no such pair (the epoch mean skips it)."""
    clean = batch.noisy_labels == batch.clean_labels
    first, second = clean, clean[perm]
    if ctx.signals is not None:
        ctx.signals.add_lambdas(lam, first, second)
    mixed_pair = first != second
    toward_clean = torch.where(first, lam, 1 - lam)
    nan = torch.tensor(float("nan"), device=lam.device)
    both = first & second
    return {
        "ram_lambda_clean_noisy": toward_clean[mixed_pair].mean() if mixed_pair.any() else nan,
        "ram_lambda_clean_clean": (2 * lam[both] - 1).abs().mean() if both.any() else nan,
    }


def _cdcl_purity(
    pseudo: torch.Tensor, beta_hat: torch.Tensor, confident: torch.Tensor, clean_labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Fig. 2b: the share of CDCL's positive pairs (same pseudo-label, both confident, both views) whose true
    classes agree, counted plainly and weighted by the β̂ gate w = β̂_a β̂_b. NaN without positive pairs.

    A sample's two views are left out: that pair is pure whatever the pseudo-label, and the gate weighs it by β̂²,
    which made the gated share look purer than the plain one (docs/results.md, Earlier measurements)."""
    labels, true, weights, conf = (t.repeat(2) for t in (pseudo, clean_labels, beta_hat.float(), confident))
    sample = torch.arange(len(pseudo), device=pseudo.device).repeat(2)
    positive = (labels[:, None] == labels[None, :]) & conf[:, None] & conf[None, :]
    positive &= sample[:, None] != sample[None, :]
    pure = (true[:, None] == true[None, :]) & positive
    gate = weights[:, None] * weights[None, :]
    nan = torch.tensor(float("nan"), device=pseudo.device)
    count, gated = positive.sum(), (gate * positive).sum()
    return {
        "cdcl_purity": pure.sum() / count if count > 0 else nan,
        "cdcl_purity_gated": (gate * pure).sum() / gated if gated > 0 else nan,
    }


def step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """One HRP iteration for both networks (SPEC §3): forward, meta step, exchange, Eq. 15, update."""
    cfg = ctx.cfg
    if batch.epoch < cfg.warmup_epochs:
        return ce_step(ctx, members, batch)
    n = len(batch.noisy_labels)
    views = _views(ctx, batch.images, len(members))
    outputs = []
    for m, (x_weak, x_strong) in zip(members, views):
        with ctx.autocast(), _running_stats_from_weak_views_only(ctx, m):
            logits, features = m.forward(torch.cat([x_weak, x_strong]), return_feature=True)
        logits = loss_precision(logits)
        probs = logits[:n].detach().softmax(dim=1)
        outputs.append(
            {
                "logits_weak": logits[:n],
                "logits_strong": logits[n:],
                "features": features,
                "probs": probs,
                "pseudo": probs.argmax(dim=1),
            }
        )
    reliability_logs: dict[str, torch.Tensor] = {}
    for k, (m, out) in enumerate(zip(members, outputs)):
        rel = _reliabilities(ctx, k, m, views[k][0], batch, out["pseudo"])
        ones = torch.ones(n, device=batch.noisy_labels.device)
        out["alpha"], out["beta"] = (ones, ones) if rel is None else (rel.alpha, rel.beta)
        if k == 0 and rel is not None and batch.clean_labels is not None:
            reliability_logs = _within_batch_aurocs(rel, out["pseudo"], batch)

    weight = ramp_weight(batch.epoch, cfg.warmup_epochs, cfg.ramp_epochs)
    per_member = [
        _hrp_member_loss(ctx, m, outputs[k], outputs[1 - k], views[k][0], batch, weight, diagnose=k == 0)
        for k, m in enumerate(members)
    ]
    loss = torch.stack([t["loss"] for t in per_member]).sum()
    shared = [key for key in per_member[0] if all(key in t for t in per_member)]  # net 1 also logs diagnostics
    update(ctx, members, loss, {k: torch.stack([t[k] for t in per_member]) for k in shared})

    alpha = torch.stack([o["alpha"] for o in outputs]).mean(dim=0)
    beta = torch.stack([o["beta"] for o in outputs]).mean(dim=0)
    if ctx.signals is not None:
        _record_hrp_signals(ctx, batch, outputs, alpha, beta)
    logs = {key: torch.stack([t[key].detach() for t in per_member]).mean() for key in shared if key != "loss"}
    logs.update({key: value.detach() for key, value in per_member[0].items() if key not in shared and key != "loss"})
    logs.update(
        loss=loss.detach(),
        alpha=alpha.mean(),
        beta=beta.mean(),
        ramp=torch.tensor(weight, device=loss.device),
        **reliability_logs,
    )
    if cfg.meta_bn == "eval_weak_stats":
        _update_running_stats(ctx, members, views)
    return logs


def _running_stats_from_weak_views_only(ctx: StepContext, member: Member):
    """meta_bn=eval_weak_stats: the training forwards (strong views, mixed images) normalise with their batch
    statistics but leave the running statistics alone; `_update_running_stats` feeds them the weak views."""
    return frozen_batchnorm_stats(member.net) if ctx.cfg.meta_bn == "eval_weak_stats" else nullcontext()


@torch.no_grad()
def _update_running_stats(
    ctx: StepContext, members: list[Member], views: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """One train-mode forward of each network's weak view, for its BN running statistics only."""
    for m, (x_weak, _) in zip(members, views):
        with ctx.autocast():
            m.forward(x_weak)


def _within_batch_aurocs(rel: Reliabilities, pseudo: torch.Tensor, batch: StepInputs) -> dict[str, torch.Tensor]:
    """Net 1's reliabilities judged within this batch (no per-batch normalisation or pooling across batches in
    the way): AUROC ×100 of α and of the unclamped meta-gradient for clean given labels, of β for correct
    pseudo-labels. NaN where the batch lacks one of the two classes (the epoch mean skips it)."""
    clean = batch.noisy_labels == batch.clean_labels
    correct = pseudo == batch.clean_labels
    return {
        "alpha_auroc_batch": batch_auroc(rel.alpha, clean),
        "alpha_signed_auroc_batch": batch_auroc(rel.alpha_signed, clean),
        "beta_auroc_batch": batch_auroc(rel.beta, correct),
    }


def _views(ctx: StepContext, images: torch.Tensor, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weak, strong) views for each network: one shared draw, or (independent_views) a draw per network,
    so the two networks' errors and the targets they exchange are less correlated."""
    draws = count if ctx.cfg.independent_views else 1
    views = [(ctx.augment.weak(images), ctx.augment.strong(images)) for _ in range(draws)]
    return views * (count // draws)


def _record_hrp_signals(
    ctx: StepContext, batch: StepInputs, outputs: list[dict[str, torch.Tensor]], alpha: torch.Tensor, beta: torch.Tensor
) -> None:
    cfg, signals, index = ctx.cfg, ctx.signals, batch.index
    signals.record("alpha", index, alpha)
    signals.record("T", index, total_reliability(alpha, beta, cfg.t_min, cfg.t_max))
    signals.record("beta", index, outputs[0]["beta"])
    record_loss(
        ctx, batch, [F.cross_entropy(o["logits_weak"].detach(), batch.noisy_labels, reduction="none") for o in outputs]
    )
    if batch.clean_labels is not None:
        signals.record("pseudo_correct", index, (outputs[0]["pseudo"] == batch.clean_labels).float())
