"""The baselines: cross-entropy (alone, or with the clean meta set as training data), GCE and co-teaching."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hrp_ood.method import coteaching_forget_rate, coteaching_select, gce_loss
from hrp_ood.trainers.base import Member, StepContext, StepInputs, record_loss, update


def ce_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """Plain cross-entropy on the noisy labels, every network (also HRP's warm-up)."""
    return _ceupdate(ctx, members, batch, ctx.augment.weak(batch.images), batch.noisy_labels)


def ce_meta_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """Cross-entropy on the noisy batch and, in the same pass, on a batch of the clean meta set with its true
    labels (each sample of the two weighs the same)."""
    meta_x, meta_y = ctx.sample_meta_batch()
    x = torch.cat([ctx.augment.weak(batch.images), meta_x])
    return _ceupdate(ctx, members, batch, x, torch.cat([batch.noisy_labels, meta_y]))


def _ceupdate(
    ctx: StepContext, members: list[Member], batch: StepInputs, x: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One step of every network on the mean CE of (x, labels), whose first rows are the training batch."""
    with ctx.autocast():
        per_sample = [F.cross_entropy(m.forward(x).float(), labels, reduction="none") for m in members]
    record_loss(ctx, batch, [ps[: len(batch.noisy_labels)] for ps in per_sample])
    loss = torch.stack([ps.mean() for ps in per_sample]).sum()
    update(ctx, members, loss, {"loss_ce": loss})
    return {"loss": loss.detach(), "loss_ce": loss.detach() / len(members)}


def gce_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    x = ctx.augment.weak(batch.images)
    with ctx.autocast():
        logits = [m.forward(x).float() for m in members]
    record_loss(ctx, batch, [F.cross_entropy(z.detach(), batch.noisy_labels, reduction="none") for z in logits])
    loss = torch.stack([gce_loss(z, batch.noisy_labels, q=ctx.cfg.gce_q) for z in logits]).sum()
    update(ctx, members, loss, {"loss_gce": loss})
    return {"loss": loss.detach(), "loss_gce": loss.detach() / len(members)}


def coteach_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """Co-teaching (Han et al. 2018): each network learns from the small-loss samples its peer selects."""
    x = ctx.augment.weak(batch.images)
    with ctx.autocast():
        per_sample = [F.cross_entropy(m.forward(x).float(), batch.noisy_labels, reduction="none") for m in members]
    record_loss(ctx, batch, per_sample)
    rate = coteaching_forget_rate(batch.epoch, ctx.forget_rate, ctx.cfg.coteach_ramp_epochs)
    keep_a, keep_b = coteaching_select(per_sample[0].detach(), per_sample[1].detach(), rate)
    loss = per_sample[0][keep_a].mean() + per_sample[1][keep_b].mean()
    update(ctx, members, loss, {"loss_ce": loss})
    return {"loss": loss.detach(), "loss_ce": loss.detach() / 2, "forget_rate": torch.tensor(rate, device=loss.device)}


def step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """The step of the method's `loss` (hrp_ood.registry.METHODS)."""
    return STEPS[ctx.cfg.spec.loss](ctx, members, batch)


STEPS = {"ce": ce_step, "ce_meta": ce_meta_step, "gce": gce_step, "coteach": coteach_step}
