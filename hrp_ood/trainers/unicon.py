"""UNICON (Karim, Rizve, Rahnavard, Mian & Shah, CVPR 2022; nazmul-karim170/UNICON-Noisy-Label @ 616dc49,
Train_cifar.py and dataloader_cifar.py).

Two networks and DivideMix's schedule and step (hrp_ood/trainers/dividemix.py: its warm-up, co-guessing,
co-refinement, MixMatch, Lx + λ·Lu + the uniform-prior penalty, the λu ramp), with UNICON's own parts:

* SELECTION, once per post-warm-up epoch, the same for both networks: the Jensen–Shannon divergence between the
  MEAN of both networks' softmax (eval mode, test transform) and the one-hot given label; the threshold is the mean
  JSD, lowered by (mean − min) / tau when the mean exceeds d_u; SR = the share of samples below it. UNIFORM
  selection: per given class, the int(SR·N / C) lowest-JSD samples (all of a class that has fewer) are labeled, the
  rest unlabeled. A labeled row's weight in co-refinement is w = 1 − JSD, or 1 where JSD < 0.5.
* Each network's pass: |L| // B steps of B labeled rows (the reference's labeled loader drops its last partial
  batch) and int(B / (2·SR)) unlabeled rows. Co-guessing and co-refinement read two WEAK views, MixMatch mixes two
  STRONG views (cfg.strong_policy: autoaugment in configs/*_unicon.yaml) of the same rows, and the loss adds
  λ_supcon · SimCLR (temperature supcon_temperature) on the projections of the unlabeled rows' two strong views
  (`projection_head`: Linear + BatchNorm1d to proj_dim, L2-normalised, as the reference's PreResNet).
* Test: the sum of the two networks' logits (registry test_rule "sum").

The per-sample `selection` signal is 1 − JSD (higher = judged clean); `loss` is the eval pass's CE (mean of the
networks).

Differences from the reference: the threshold IS lowered above d_u (the reference raises a NameError there, but with
its natural-log JSD, at most ln 2 < 0.7, never reaches it; `unicon_jsd_bits` measures the JSD in bits, where it can);
one selection per epoch for both passes (the reference selects again before network 2's pass, after network 1's,
with network 1 in train mode); both networks in eval mode for the selection; the labeled set is exactly the quota
(the reference pads its index array with sample 0 when SR·N is not a multiple of C); the unlabeled rows of a pass
that runs past |U| continue into the next shuffle (the reference's drop_last loader drops the remainder); the lr
schedule is the config's (configs/*_unicon.yaml: cosine over the whole run).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hrp_ood.config import TrainConfig
from hrp_ood.method import cdcl_loss
from hrp_ood.trainers.base import EpochPlan, Member, StepContext, StepInputs, loss_precision, update
from hrp_ood.trainers.dividemix import (
    first_step_flags,
    lambda_u_weight,
    mixmatch_member_loss,
    planned_members,
    shuffled_cycle,
    warmup_plan,
    warmup_step,
)


def reference_values(cfg: TrainConfig) -> dict[str, Any]:
    """Train_cifar.py's λu: 30 for every dataset and noise level (its default; the README's runs set no other)."""
    return {"lambda_u": 30.0}


# ---- the projection head --------------------------------------------------------------------------------------


class LinearProjection(nn.Module):
    """The reference's projection of the penultimate features: z = normalize(BatchNorm1d(W h + b))."""

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = nn.BatchNorm1d(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.norm(self.linear(features)), dim=1)


def projection_head(cfg: TrainConfig, net: nn.Module) -> nn.Module:
    return LinearProjection(net.num_features, cfg.proj_dim)


# ---- selection ------------------------------------------------------------------------------------------------


def jsd_to_label(probs: torch.Tensor, labels: torch.Tensor, bits: bool = False) -> torch.Tensor:
    """JSD(p_i, onehot(y_i)) per row, in nats (the reference's natural log; at most ln 2) or in bits (at most 1).
    Against a one-hot label only p = p_i[y_i] matters: JSD = ln 2 + ½·(p ln p − (1 + p) ln(1 + p))."""
    p = probs.float().gather(1, labels[:, None]).squeeze(1)
    jsd = (math.log(2) + 0.5 * (torch.special.xlogy(p, p) - (1 + p) * torch.log1p(p))).clamp_min(0)
    return jsd / math.log(2) if bits else jsd


def selection_threshold(jsd: torch.Tensor, d_u: float, tau: float) -> float:
    """The mean JSD; above d_u, lowered by (mean − min) / tau (the paper's rule; the reference raises a NameError
    there, `arg.tau`)."""
    mean = float(jsd.mean())
    return mean - (mean - float(jsd.min())) / tau if mean > d_u else mean


def selected_ratio(jsd: torch.Tensor, threshold: float) -> float:
    """SR: the share of samples strictly below the threshold."""
    return float((jsd < threshold).float().mean())


def uniform_selection(jsd: torch.Tensor, labels: torch.Tensor, num_classes: int, quota: int) -> torch.Tensor:
    """Labeled mask: per given class, its `quota` lowest-JSD samples (every sample of a class that has fewer)."""
    by_jsd = torch.argsort(jsd, stable=True)
    order = by_jsd[torch.argsort(labels[by_jsd], stable=True)]  # grouped by class, ascending JSD within a class
    counts = torch.bincount(labels, minlength=num_classes)
    class_start = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(jsd), device=jsd.device) - class_start[labels[order]]
    labeled = torch.zeros(len(jsd), dtype=torch.bool, device=jsd.device)
    labeled[order] = rank_in_class < quota
    return labeled


def class_quota(ratio: float, num_samples: int, num_classes: int, batch_size: int) -> int:
    """int(SR·N / C), the reference's class_len; at least enough for one labeled batch (the reference crashes on
    an empty labeled loader)."""
    return max(int(ratio * num_samples / num_classes), math.ceil(batch_size / num_classes))


def label_weights(jsd: torch.Tensor) -> torch.Tensor:
    """Co-refinement's w: 1 where JSD < 0.5, else 1 − JSD."""
    return torch.where(jsd < 0.5, torch.ones_like(jsd), 1 - jsd)


def unlabeled_batch_size(batch_size: int, ratio: float, unlabeled: int) -> int:
    """int(B / (2·SR)), the reference's unlabeled loader; at most |U| (its drop_last loader would be empty)."""
    wanted = int(batch_size / (2 * ratio)) if ratio > 0 else unlabeled
    return max(1, min(wanted, unlabeled))


def mean_softmax_and_loss(
    ctx: StepContext, members: list[Member], images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over the networks of the softmax, mean over the networks of the CE on `labels`) of every image:
    eval mode, test transform, no shuffle; the networks' modes are restored."""
    modes = [m.net.training for m in members]
    for m in members:
        m.net.eval()
    probs, losses = [], []
    with torch.no_grad(), ctx.autocast():
        for start in range(0, len(images), ctx.cfg.eval_batch_size):
            x = ctx.augment.normalize(images[start : start + ctx.cfg.eval_batch_size])
            y = labels[start : start + len(x)]
            logits = [loss_precision(m.net(x)) for m in members]
            probs.append(torch.stack([z.softmax(dim=1) for z in logits]).mean(dim=0))
            losses.append(torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits]).mean(dim=0))
    for m, mode in zip(members, modes):
        m.net.train(mode)
    return torch.cat(probs), torch.cat(losses)


class Division(NamedTuple):
    labeled: torch.Tensor  # (N,) bool
    weight: torch.Tensor  # (N,) co-refinement's w
    ratio: float  # SR
    threshold: float


def uniform_division(ctx: StepContext, members: list[Member], data: Any) -> Division:
    """The epoch's selection (see module); keeps `selection` = 1 − JSD and `eval_loss` for the signals."""
    cfg = ctx.cfg
    probs, losses = mean_softmax_and_loss(ctx, members, data.images, data.noisy_labels)
    jsd = jsd_to_label(probs, data.noisy_labels, bits=cfg.unicon_jsd_bits)
    threshold = selection_threshold(jsd, cfg.unicon_d_u, cfg.unicon_tau)
    ratio = selected_ratio(jsd, threshold)
    quota = class_quota(ratio, len(jsd), data.num_classes, cfg.batch_size)
    labeled = uniform_selection(jsd, data.noisy_labels, data.num_classes, quota)
    ctx.method_state["selection"] = 1 - jsd
    ctx.method_state["eval_loss"] = losses.float()
    return Division(labeled, label_weights(jsd), ratio, threshold)


# ---- the epoch plan -------------------------------------------------------------------------------------------


def member_pass(net: int, division: Division, batch_size: int, epoch: float) -> dict[str, torch.Tensor]:
    """Network `net`'s steps: |L| // B batches of one shuffle of L (at least one), each with int(B / (2·SR))
    unlabeled rows drawn in turn from fresh shuffles of U. The λu ramp's fraction is i / (|L| // B + 1)."""
    labeled_rows = division.labeled.nonzero().squeeze(1).cpu()
    unlabeled_rows = (~division.labeled).nonzero().squeeze(1).cpu()
    steps = max(1, len(labeled_rows) // batch_size)
    index = shuffled_cycle(labeled_rows, steps, batch_size)
    has_unlabeled = len(unlabeled_rows) > 0
    if has_unlabeled:
        width = unlabeled_batch_size(batch_size, division.ratio, len(unlabeled_rows))
        unlabeled = shuffled_cycle(unlabeled_rows, steps, width)
    else:
        unlabeled = index.clone()
    return {
        "index": index,
        "net": torch.full((steps,), net, dtype=torch.long),
        "unlabeled": unlabeled,
        "has_unlabeled": torch.full((steps,), has_unlabeled),
        "weight": division.weight.cpu()[index].float(),
        "epoch_time": epoch + torch.arange(steps).double() / (len(labeled_rows) // batch_size + 1),
        "selected_ratio": torch.full((steps,), division.ratio),
        "jsd_threshold": torch.full((steps,), division.threshold),
    }


def epoch_plan(ctx: StepContext, members: list[Member], data: Any, epoch: int) -> EpochPlan:
    """Warm-up: DivideMix's CE pass per network. Later: the selection, then network 1's pass and network 2's,
    each on its own shuffles of the same division."""
    cfg = ctx.cfg
    if epoch < cfg.warmup_epochs:
        return warmup_plan(len(data.noisy_labels), 2 * cfg.batch_size, len(members))
    division = uniform_division(ctx, members, data)
    passes = [member_pass(k, division, cfg.batch_size, epoch) for k in range(len(members))]
    index = torch.cat([p.pop("index") for p in passes])
    extras = {key: torch.cat([p[key] for p in passes]) for key in passes[0]}
    extras["first"] = first_step_flags(len(index))
    return EpochPlan(index, extras=extras)


# ---- the step -------------------------------------------------------------------------------------------------


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (the reference's SupConLoss without labels, contrast_mode "all"): each of the 2n unit
    embeddings is an anchor whose one positive is the other view of its sample, against the 2n − 1 others. It is
    SupCon with every sample its own class: `cdcl_loss` with unit weights."""
    n = len(z1)
    ones = torch.ones(n, device=z1.device)
    return cdcl_loss(torch.cat([z1, z2]), torch.arange(n, device=z1.device), ones, ones.bool(), tau=temperature)


def unlabeled_contrastive_loss(
    ctx: StepContext, member: Member, views: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """SimCLR on the projections of the two views, each its own forward (BN statistics per view, as the
    reference), network and head in train mode."""
    member.net.train()
    member.head.train()
    projections = []
    for view in views:
        with ctx.autocast():
            _, features = member.forward(view, return_feature=True)
            projections.append(loss_precision(member.head_forward(features)))
    return simclr_loss(*projections, ctx.cfg.supcon_temperature)


def step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """One step of the network the plan names: warm-up CE, or its UNICON pass (see module)."""
    extras = batch.extras
    member, peer = planned_members(ctx, members, batch)
    if "unlabeled" not in extras:
        return warmup_step(ctx, member, batch)
    cfg, augment = ctx.cfg, ctx.augment
    x = batch.images
    x_weak, x_strong = (augment.weak(x), augment.weak(x)), (augment.strong(x), augment.strong(x))
    u_weak = u_strong = None
    if bool(extras["has_unlabeled"]):
        u = ctx.train_images[extras["unlabeled"].to(x.device)]
        u_weak, u_strong = (augment.weak(u), augment.weak(u)), (augment.strong(u), augment.strong(u))
    lam_u = lambda_u_weight(cfg.lambda_u, float(extras["epoch_time"]), cfg.warmup_epochs, cfg.ramp_epochs)
    weight = extras["weight"].to(x.device)
    terms = mixmatch_member_loss(
        ctx,
        member,
        peer,
        x_weak,
        batch.noisy_labels,
        weight,
        u_weak,
        lam_u,
        labeled_mix_views=x_strong,
        unlabeled_mix_views=u_strong,
    )
    if u_strong is not None:
        terms["loss_supcon"] = unlabeled_contrastive_loss(ctx, member, u_strong)
    else:
        terms["loss_supcon"] = terms["loss"] * 0
    terms["loss"] = terms["loss"] + cfg.lambda_supcon * terms["loss_supcon"]
    update(ctx, [member], terms["loss"], terms)
    logs = {key: value.detach() for key, value in terms.items()}
    device = logs["loss"].device
    logs["lambda_u"] = torch.tensor(lam_u, device=device)
    logs["selected_ratio"] = extras["selected_ratio"].to(device, torch.float32)
    logs["jsd_threshold"] = extras["jsd_threshold"].to(device, torch.float32)
    return logs
