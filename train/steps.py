"""One optimisation step of each method (SPEC §3.4–3.5): CE (with or without the clean meta set), GCE,
co-teaching, HRP and its ablations.

A step function takes the run's `Members` (one or two networks with their optimisers), a batch of uint8
images with their noisy labels, and the fractional epoch; it updates the networks and returns detached
scalar tensors to log (never `.item()` here: a GPU step must not wait on the host).

Data-parallel (torchrun): each rank runs the same step on its slice of the global batch; `Member.forward`
and `Member.head_forward` are the DDP-wrapped modules, `Member.net` the plain one the meta step
differentiates. The losses follow the gradient convention of `hrp_ood.distributed` (each rank's loss is
W × its share, DDP averages), so the update equals one process on the whole batch; the logged terms
are rank-local (the trainer averages them over ranks), the non-finite check is global.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hrp_ood.train.signals import EpochSignals, batch_auroc
from torch import nn

from hrp_ood.config import TrainConfig
from hrp_ood.data.augment import BatchAugment
from hrp_ood.distributed import broadcast_from_main, global_sum, rank, world_size
from hrp_ood.method import (
    ReliabilityMemory,
    cdcl_loss,
    consistency_loss,
    coteaching_forget_rate,
    coteaching_select,
    gce_loss,
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
from hrp_ood.models import frozen_batchnorm_stats


@dataclass
class Member:
    """One co-trained network: backbone, optional CDCL projection head, optimiser, lr schedule."""

    net: nn.Module
    head: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # the training passes; `torch.compile(net)` with --set compile=true. The meta step differentiates
    # `net` itself (functional_call + forward-mode AD), which compiled graphs do not support.
    forward: Callable[..., Any] | None = None
    # the projection head's training pass (DDP-wrapped in a data-parallel run)
    head_forward: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.net
        if self.head_forward is None:
            self.head_forward = self.head

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


@dataclass
class StepInputs:
    images: torch.Tensor  # uint8 (n, 3, H, W) on the device
    noisy_labels: torch.Tensor
    index: torch.Tensor  # positions in the training set (per-sample reliability memory and logging)
    epoch: float  # fractional epoch, drives warm-up / ramp schedules
    clean_labels: torch.Tensor | None = None  # for the logged diagnostics only: no training computation reads them


@dataclass
class StepContext:
    cfg: TrainConfig
    augment: BatchAugment
    meta_images: torch.Tensor
    meta_labels: torch.Tensor
    autocast_device: str | None  # "cuda" when AMP is on, else None
    forget_rate: float = 0.0
    skipped_steps: int = 0  # non-finite steps skipped under on_nonfinite="skip"
    signals: EpochSignals | None = None  # this epoch's per-sample diagnostics (train/signals.py), if recorded
    # one per network: the per-sample averages of its meta-gradients (reliability_momentum > 0)
    memories: list[ReliabilityMemory] = field(default_factory=list)

    def autocast(self):
        if self.autocast_device is None:
            return nullcontext()
        return torch.autocast(self.autocast_device, dtype=torch.bfloat16)

    def sample_meta_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random meta batch (without replacement); data-parallel: rank 0 draws it, each rank takes an
        equal slice, so the ranks' mean meta gradient is the one of the whole meta batch."""
        ranks = world_size()
        count = min(self.cfg.meta_batch_size, len(self.meta_labels)) // ranks * ranks
        pick = torch.randperm(len(self.meta_labels), device=self.meta_labels.device)[:count]
        pick = broadcast_from_main(pick).chunk(ranks)[rank()]
        return self.augment.weak(self.meta_images[pick]), self.meta_labels[pick]


class NonFiniteLoss(Exception):
    """Raised before any weight changes, naming the loss terms that are not finite."""

    def __init__(self, terms: list[str]):
        super().__init__(", ".join(terms))
        self.terms = terms


def _loss_precision(t: torch.Tensor) -> torch.Tensor:
    """Autocast's half-precision outputs are promoted to float32 for the losses; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _update(ctx: StepContext, members: list[Member], loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
    """Backward and step every member's optimiser, unless the loss is not finite (then raise or skip)."""
    for m in members:
        m.optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(global_sum(loss.detach())):  # every rank takes the same branch
        if ctx.cfg.on_nonfinite == "skip":
            ctx.skipped_steps += 1
            return
        raise NonFiniteLoss([k for k, v in terms.items() if k.startswith("loss") and not torch.isfinite(v).all()])
    loss.backward()
    for m in members:
        m.optimizer.step()


def ce_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """Plain cross-entropy on the noisy labels, every network (also HRP's warm-up)."""
    return _ce_update(ctx, members, batch, ctx.augment.weak(batch.images), batch.noisy_labels)


def ce_meta_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """Cross-entropy on the noisy batch and, in the same pass, on a batch of the clean meta set with its true
    labels (each sample of the two weighs the same)."""
    meta_x, meta_y = ctx.sample_meta_batch()
    x = torch.cat([ctx.augment.weak(batch.images), meta_x])
    return _ce_update(ctx, members, batch, x, torch.cat([batch.noisy_labels, meta_y]))


def _ce_update(
    ctx: StepContext, members: list[Member], batch: StepInputs, x: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One step of every network on the mean CE of (x, labels), whose first rows are the training batch."""
    with ctx.autocast():
        per_sample = [F.cross_entropy(m.forward(x).float(), labels, reduction="none") for m in members]
    _record_loss(ctx, batch, [ps[: len(batch.noisy_labels)] for ps in per_sample])
    loss = torch.stack([ps.mean() for ps in per_sample]).sum()
    _update(ctx, members, loss, {"loss_ce": loss})
    return {"loss": loss.detach(), "loss_ce": loss.detach() / len(members)}


def gce_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    x = ctx.augment.weak(batch.images)
    with ctx.autocast():
        logits = [m.forward(x).float() for m in members]
    _record_loss(ctx, batch, [F.cross_entropy(z.detach(), batch.noisy_labels, reduction="none") for z in logits])
    loss = torch.stack([gce_loss(z, batch.noisy_labels, q=ctx.cfg.gce_q) for z in logits]).sum()
    _update(ctx, members, loss, {"loss_gce": loss})
    return {"loss": loss.detach(), "loss_gce": loss.detach() / len(members)}


def coteach_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """Co-teaching (Han et al. 2018): each network learns from the small-loss samples its peer selects."""
    x = ctx.augment.weak(batch.images)
    with ctx.autocast():
        per_sample = [F.cross_entropy(m.forward(x).float(), batch.noisy_labels, reduction="none") for m in members]
    _record_loss(ctx, batch, per_sample)
    rate = coteaching_forget_rate(batch.epoch, ctx.forget_rate, ctx.cfg.coteach_ramp_epochs)
    keep_a, keep_b = coteaching_select(per_sample[0].detach(), per_sample[1].detach(), rate)
    loss = per_sample[0][keep_a].mean() + per_sample[1][keep_b].mean()
    _update(ctx, members, loss, {"loss_ce": loss})
    return {"loss": loss.detach(), "loss_ce": loss.detach() / 2, "forget_rate": torch.tensor(rate, device=loss.device)}


def _record_loss(ctx: StepContext, batch: StepInputs, per_sample: list[torch.Tensor]) -> None:
    """The small-loss signal (CE on the noisy label, mean over the networks) for the epoch's diagnostics."""
    if ctx.signals is not None:
        ctx.signals.record("loss", batch.index, torch.stack(per_sample).detach().mean(dim=0))


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

    `diagnose` (net 1 only) adds the measurements of train/signals.py: S's class histogram, RAM's λ by pair
    type and CDCL's positive-pair purity with and without the β̂ gate (these read the clean labels).
    """
    cfg, spec = ctx.cfg, ctx.cfg.spec
    noisy = batch.noisy_labels
    targets, high_conf = refine_targets(peer["probs"], noisy, cfg.tau_match, cfg.tau_conf, cfg.sharpen_temperature)
    T = total_reliability(peer["alpha"], peer["beta"], cfg.t_min, cfg.t_max)
    terms = {
        "loss_ce": _ce_term(cfg, own, peer, targets, T, high_conf, noisy),
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
        mixed = reliability_mixup(
            x_weak, targets, T, cfg.kappa, symmetric=spec.symmetric_ram, gated=spec.grg, eps=cfg.delta
        )
        with ctx.autocast(), _running_stats_from_weak_views_only(ctx, member):
            mixed_logits = _loss_precision(member.forward(mixed.inputs))
        terms["loss_ram"] = ram_loss(mixed_logits, mixed.targets, mixed.gate)
        terms["gate"] = mixed.gate.mean()
        terms["lambda"] = mixed.lam.mean()
        loss = loss + weight * terms["loss_ram"]
        if diagnose and batch.clean_labels is not None:
            terms.update(_ram_diagnostics(ctx, mixed.lam, mixed.perm, batch))
    if weight > 0 and spec.cdcl:
        z = member.head_forward(_loss_precision(own["features"]))
        confident = peer["probs"].max(dim=1).values >= cfg.tau_conf
        beta_hat = normalize_beta(peer["beta"], cfg.delta)
        terms["loss_cdcl"] = cdcl_loss(z, peer["pseudo"], beta_hat, confident, cfg.cdcl_temperature)
        loss = loss + weight * cfg.lambda_c * terms["loss_cdcl"]
        if diagnose and batch.clean_labels is not None:
            terms.update(_cdcl_purity(peer["pseudo"], beta_hat, confident, batch.clean_labels))
    terms["loss"] = loss
    return terms


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


def hrp_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
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
        logits = _loss_precision(logits)
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
    _update(ctx, members, loss, {k: torch.stack([t[k] for t in per_member]) for k in shared})

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
    _record_loss(
        ctx, batch, [F.cross_entropy(o["logits_weak"].detach(), batch.noisy_labels, reduction="none") for o in outputs]
    )
    if batch.clean_labels is not None:
        signals.record("pseudo_correct", index, (outputs[0]["pseudo"] == batch.clean_labels).float())


STEPS = {"ce": ce_step, "ce_meta": ce_meta_step, "gce": gce_step, "coteach": coteach_step, "hrp": hrp_step}
