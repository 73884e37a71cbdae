"""LongReMix (Cordeiro et al., Pattern Recognition 2022; filipe-research/LongReMix @ 567c89b) as ONE run that
switches stage at epoch `longremix_stage1_epochs` (the reference runs two scripts).

Stage 1 (Train_cifar_longremix_stage1.py): DivideMix's warm-up and GMM every epoch (warm-up epochs included),
with a constant lr. A network's high-confidence set (HCS) is the samples its GMM labeled (prob > p_threshold) in
EACH of the last `hcs_epochs` epochs (an AND of masks, kept in `method_state`). After warm-up, network k trains on
network (1 − k)'s HCS as the labeled set (with that network's GMM probability as w); the rest is unlabeled.
Network 1's largest HCS of the last `hcs_search_epochs` stage-1 epochs is kept (ties: the latest).

Stage 2 (Train_cifar_longremix_stage2.py): FRESH networks (re-initialised in place: new weights from
`create_model` under a seeded generator, optimiser state cleared), DivideMix's warm-up again, then DivideMix with
the clean probability forced to 1 on the kept HCS, (|L| + |U|) // B + 1 steps per network and epoch (the labeled set
re-shuffled and cycled). The learning rate follows the config's schedule in absolute epochs: constant through stage
1 and stage 2's first 150 epochs, then ×0.1 (configs: lr_milestones [stage1 + 150]), which is the reference's
restart of its schedule; the warm-up and λu ramp count from the stage's first epoch.

The maths and the step are DivideMix's (hrp_ood/trainers/dividemix.py); this module only plans the epochs.
"""

from __future__ import annotations

from typing import Any

import torch

from hrp_ood.models import create_model
from hrp_ood.trainers.base import EpochPlan, Member, StepContext
from hrp_ood.trainers.dividemix import (
    clean_probabilities,
    co_divide_plan,
    labeled_mask,
    reference_values,
    step,
    warmup_plan,
)

__all__ = ["epoch_plan", "reference_values", "step"]


def high_confidence_set(masks: torch.Tensor) -> torch.Tensor:
    """(networks, epochs, N) bool labeled masks → (networks, N): labeled in every one of the epochs."""
    return masks.all(dim=1)


def remember_labeled(ctx: StepContext, labeled: torch.Tensor) -> torch.Tensor:
    """Append this epoch's (networks, N) labeled masks to `method_state["hcs_masks"]` (the last hcs_epochs kept);
    returns each network's HCS."""
    state = ctx.method_state
    masks = labeled[:, None]
    if "hcs_masks" in state:
        masks = torch.cat([state["hcs_masks"].to(masks.device), masks], dim=1)
    state["hcs_masks"] = masks[:, -ctx.cfg.hcs_epochs :]
    return high_confidence_set(state["hcs_masks"])


def keep_largest(ctx: StepContext, hcs: torch.Tensor, epoch: int) -> None:
    """Network 1's HCS replaces the kept one (`method_state["hcs_best"]`) if at least as large, within the last
    hcs_search_epochs stage-1 epochs after warm-up (the reference searches the post-warm-up history)."""
    cfg, state = ctx.cfg, ctx.method_state
    if epoch < max(cfg.warmup_epochs, cfg.longremix_stage1_epochs - cfg.hcs_search_epochs):
        return
    best = state.get("hcs_best")
    if best is None or int(hcs.sum()) >= int(best.sum()):
        state["hcs_best"] = hcs.clone()


def stage1_plan(ctx: StepContext, members: list[Member], data: Any, epoch: int) -> EpochPlan:
    cfg = ctx.cfg
    probs = clean_probabilities(ctx, members, data, epoch)
    hcs = remember_labeled(ctx, torch.stack([p > cfg.p_threshold for p in probs]))
    keep_largest(ctx, hcs[0], epoch)
    if epoch < cfg.warmup_epochs:
        return warmup_plan(len(data.noisy_labels), 2 * cfg.batch_size, len(members))
    # the HCS is the labeled set; one smaller than a batch is topped up by clean probability
    labeled = [labeled_mask(2 * h.float() + p, 1.5, cfg.batch_size) for h, p in zip(hcs, probs)]
    return co_divide_plan(probs, labeled, cfg.batch_size, epoch)


def start_stage2(ctx: StepContext, members: list[Member], num_classes: int) -> None:
    """Fresh networks and optimisers in place, and a fresh loss history; the kept HCS stays."""
    cfg, state = ctx.cfg, ctx.method_state
    for k, member in enumerate(members):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((cfg.seed * 1_000_003 + 7919 * (k + 1)) % 2**32)
            fresh = create_model(cfg.model, num_classes=num_classes)
        member.net.load_state_dict(fresh.state_dict())
        member.optimizer.state.clear()
    for key in ("loss_history", "hcs_masks"):
        state.pop(key, None)
    if "hcs_best" not in state:  # a stage 1 shorter than its warm-up found none
        state["hcs_best"] = torch.zeros(0, dtype=torch.bool)


def stage2_plan(ctx: StepContext, members: list[Member], data: Any, epoch: int) -> EpochPlan:
    """`epoch` counts from stage 2's first."""
    cfg = ctx.cfg
    probs = clean_probabilities(ctx, members, data, cfg.longremix_stage1_epochs + epoch)
    if epoch < cfg.warmup_epochs:
        return warmup_plan(len(data.noisy_labels), 2 * cfg.batch_size, len(members))
    hcs = ctx.method_state["hcs_best"].to(probs[0].device)
    if len(hcs):
        probs = [torch.where(hcs, torch.ones_like(p), p) for p in probs]
    ctx.method_state["selection"] = torch.stack(probs).mean(dim=0)
    labeled = [labeled_mask(p, cfg.p_threshold, cfg.batch_size) for p in probs]
    total = len(data.noisy_labels) // cfg.batch_size + 1  # (|L| + |U|) // B + 1
    return co_divide_plan(probs, labeled, cfg.batch_size, epoch, steps=(total, total))


def epoch_plan(ctx: StepContext, members: list[Member], data: Any, epoch: int) -> EpochPlan:
    stage1 = ctx.cfg.longremix_stage1_epochs
    if epoch < stage1:
        return stage1_plan(ctx, members, data, epoch)
    if epoch == stage1:
        start_stage2(ctx, members, data.num_classes)
    return stage2_plan(ctx, members, data, epoch - stage1)
