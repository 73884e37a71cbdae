"""One optimisation step of each method (SPEC §3.4–3.5): CE, GCE, co-teaching, HRP and its ablations.

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

from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hrp_ood.config import TrainConfig
from hrp_ood.data.augment import BatchAugment
from hrp_ood.distributed import broadcast_from_main, global_sum, rank, world_size
from hrp_ood.method import (
    consistency_loss,
    cdcl_loss,
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
)


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
    index: torch.Tensor  # positions in the training set (for per-sample logging)
    epoch: float  # fractional epoch, drives warm-up / ramp schedules


@dataclass
class StepContext:
    cfg: TrainConfig
    augment: BatchAugment
    meta_images: torch.Tensor
    meta_labels: torch.Tensor
    autocast_device: str | None  # "cuda" when AMP is on, else None
    forget_rate: float = 0.0
    skipped_steps: int = 0  # non-finite steps skipped under on_nonfinite="skip"
    # per-sample reliabilities seen this epoch (for the clean-vs-corrupted AUROC in metrics.csv)
    alpha_seen: torch.Tensor | None = field(default=None)
    total_seen: torch.Tensor | None = field(default=None)

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
    x = ctx.augment.weak(batch.images)
    with ctx.autocast():
        losses = [F.cross_entropy(m.forward(x).float(), batch.noisy_labels) for m in members]
    loss = torch.stack(losses).sum()
    _update(ctx, members, loss, {"loss_ce": loss})
    return {"loss": loss.detach(), "loss_ce": loss.detach() / len(members)}


def gce_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    x = ctx.augment.weak(batch.images)
    with ctx.autocast():
        loss = torch.stack([gce_loss(m.forward(x).float(), batch.noisy_labels, q=ctx.cfg.gce_q) for m in members]).sum()
    _update(ctx, members, loss, {"loss_gce": loss})
    return {"loss": loss.detach(), "loss_gce": loss.detach() / len(members)}


def coteach_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """Co-teaching (Han et al. 2018): each network learns from the small-loss samples its peer selects."""
    x = ctx.augment.weak(batch.images)
    with ctx.autocast():
        per_sample = [F.cross_entropy(m.forward(x).float(), batch.noisy_labels, reduction="none") for m in members]
    rate = coteaching_forget_rate(batch.epoch, ctx.forget_rate, ctx.cfg.coteach_ramp_epochs)
    keep_a, keep_b = coteaching_select(per_sample[0].detach(), per_sample[1].detach(), rate)
    loss = per_sample[0][keep_a].mean() + per_sample[1][keep_b].mean()
    _update(ctx, members, loss, {"loss_ce": loss})
    return {"loss": loss.detach(), "loss_ce": loss.detach() / 2,
            "forget_rate": torch.tensor(rate, device=loss.device)}


def _reliabilities(ctx: StepContext, member: Member, x_weak: torch.Tensor, noisy: torch.Tensor,
                   pseudo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α, β of SPEC §3.1 computed on this member's parameters (or ones for the no-meta variants)."""
    if not ctx.cfg.spec.meta:
        ones = torch.ones(len(noisy), device=noisy.device)
        return ones, ones
    meta_x, meta_y = ctx.sample_meta_batch()
    rel = meta_reliabilities(member.net, x_weak, noisy, pseudo, meta_x, meta_y, member.lr,
                             normalization=ctx.cfg.spec.normalization, method=ctx.cfg.meta_method,
                             delta=ctx.cfg.delta)
    return rel.alpha, rel.beta


def _hrp_member_loss(ctx: StepContext, member: Member, own: dict[str, torch.Tensor], peer: dict[str, torch.Tensor],
                     x_weak: torch.Tensor, noisy: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """Eq. 15 for one network, trained with the targets, pseudo-labels, α and β its peer computed."""
    cfg, spec = ctx.cfg, ctx.cfg.spec
    targets, high_conf = refine_targets(peer["probs"], noisy, cfg.tau_match, cfg.tau_conf, cfg.sharpen_temperature)
    T = total_reliability(peer["alpha"], peer["beta"], cfg.t_min, cfg.t_max)
    terms = {
        "loss_ce": reweighted_ce(own["logits_weak"], targets, T, high_conf, cfg.gamma),
        "loss_cons": consistency_loss(own["logits_weak"], own["logits_strong"]),
        "high_conf": high_conf.float().mean(),
        "T": T.mean(),
    }
    loss = terms["loss_ce"] + cfg.lambda_cons * terms["loss_cons"]
    if cfg.lambda_prior > 0:
        terms["loss_prior"] = prior_penalty(own["logits_weak"])
        loss = loss + cfg.lambda_prior * terms["loss_prior"]
    if weight > 0 and spec.ram:
        mixed = reliability_mixup(x_weak, targets, T, cfg.kappa, symmetric=spec.symmetric_ram, gated=spec.grg,
                                  eps=cfg.delta)
        with ctx.autocast():
            mixed_logits = _loss_precision(member.forward(mixed.inputs))
        terms["loss_ram"] = ram_loss(mixed_logits, mixed.targets, mixed.gate)
        terms["gate"] = mixed.gate.mean()
        terms["lambda"] = mixed.lam.mean()
        loss = loss + weight * terms["loss_ram"]
    if weight > 0 and spec.cdcl:
        z = member.head_forward(_loss_precision(own["features"]))
        confident = peer["probs"].max(dim=1).values >= cfg.tau_conf
        terms["loss_cdcl"] = cdcl_loss(z, peer["pseudo"], normalize_beta(peer["beta"], cfg.delta), confident,
                                       cfg.cdcl_temperature)
        loss = loss + weight * cfg.lambda_c * terms["loss_cdcl"]
    terms["loss"] = loss
    return terms


def hrp_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """One HRP iteration for both networks (SPEC §3): forward, meta step, exchange, Eq. 15, update."""
    cfg = ctx.cfg
    if batch.epoch < cfg.warmup_epochs:
        return ce_step(ctx, members, batch)
    n = len(batch.noisy_labels)
    x_weak, x_strong = ctx.augment.weak(batch.images), ctx.augment.strong(batch.images)
    outputs = []
    for m in members:
        with ctx.autocast():
            logits, features = m.forward(torch.cat([x_weak, x_strong]), return_feature=True)
        logits = _loss_precision(logits)
        probs = logits[:n].detach().softmax(dim=1)
        outputs.append({"logits_weak": logits[:n], "logits_strong": logits[n:], "features": features,
                        "probs": probs, "pseudo": probs.argmax(dim=1)})
    for m, out in zip(members, outputs):
        out["alpha"], out["beta"] = _reliabilities(ctx, m, x_weak, batch.noisy_labels, out["pseudo"])

    weight = ramp_weight(batch.epoch, cfg.warmup_epochs, cfg.ramp_epochs)
    per_member = [
        _hrp_member_loss(ctx, m, outputs[k], outputs[1 - k], x_weak, batch.noisy_labels, weight)
        for k, m in enumerate(members)
    ]
    loss = torch.stack([t["loss"] for t in per_member]).sum()
    _update(ctx, members, loss, {k: torch.stack([t[k] for t in per_member]) for k in per_member[0]})

    alpha = torch.stack([o["alpha"] for o in outputs]).mean(dim=0)
    beta = torch.stack([o["beta"] for o in outputs]).mean(dim=0)
    if ctx.alpha_seen is not None:
        ctx.alpha_seen[batch.index] = alpha
        ctx.total_seen[batch.index] = total_reliability(alpha, beta, cfg.t_min, cfg.t_max)
    logs = {key: torch.stack([t[key].detach() for t in per_member]).mean()
            for key in per_member[0] if key != "loss"}
    logs.update(loss=loss.detach(), alpha=alpha.mean(), beta=beta.mean(),
                ramp=torch.tensor(weight, device=loss.device))
    return logs


STEPS = {"ce": ce_step, "gce": gce_step, "coteach": coteach_step, "hrp": hrp_step}
