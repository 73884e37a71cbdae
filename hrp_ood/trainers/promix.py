"""ProMix (Xiao et al., IJCAI 2023; Justherozen/ProMix @ 40d8378, Train_promix.py).

Two networks (our backbone `cfg.model`, as every method of the comparison; the reference's is a BasicBlock
ResNet-18), each with its primary head (the network's `fc`) and a pseudo head (`projection_head`: a Linear on the
penultimate features). The reference's one SGD optimiser over both networks and our one per network make the same
updates: SGD with momentum and weight decay acts on each parameter alone.

Warm-up (`warmup_epochs`): CE on a weak view for both networks (+ the negative entropy under asymmetric noise).

Each later epoch, before training (`epoch_plan`), each network's OWN class-wise small-loss selection (CSS): an
eval-mode pass over the training set (test transform), CE on the noisy label, and per noisy class j the
max(min(⌈ρ·N/K⌉, N_j), 1) rows of smallest loss (N the training set, K the classes; the reference min–max
normalises the losses first, which leaves each class's order as it is); ρ = ρ_start + (ρ_end − ρ_start)·min(e/50, 1).

Each step (`step`), both networks see the same weak and strong views; network k, on its own selection:
* matched high confidence (MHCS): rows whose unadjusted softmax on the given label exceeds τ join the chosen set;
* label guessing by agreement (LGA), when epoch > epochs − promix_expand_epochs: rows where both networks predict
  the same class with max probability > τ join, the most confident first, until 0.9·B rows are chosen; their target
  is network k's debiased prediction argmax softmax(z − τ_pl·log π_k);
* the primary head: CE(z_weak + τ_out·log π_k) + w·(CE on the strong view + Mixup (Beta(4, 4), λ = max(λ, 1 − λ))
  + FMix) on the chosen rows, w = min(e/50, 1); the pseudo head: the same (its own Mixup and FMix draws) plus
  β·(CE + w·CE on the strong view) of its logits adjusted by the unchosen rows' prior, towards sharpened (T) debiased
  pseudo-labels of the primary head, softmax(z − τ_pl·log π_k^u)^(1/T); β = 0.1·min(e/100, 1) before epoch 100,
  0 from then on (the reference zeroes it there);
* π_k (chosen rows) and π_k^u (unchosen rows): EMAs (0.9999) of the mean unadjusted softmax of the primary head,
  updated after the losses are formed; uniform at first; kept in `ctx.method_state` (saved in last.pt).
Every forward is a separate train-mode pass (separate BatchNorm batches) as in the reference: per network the weak
and strong views (both heads), Mixup and FMix for the primary head, Mixup and FMix for the pseudo head.

Test: the mean of the two primary heads' logits (registry test_rule "mean"); the pseudo heads are not used.

Differences from the reference (docs/method.md): empty chosen / unchosen sets give a zero loss and leave π as it was
(the reference's mean over no rows is NaN and would poison π); the strong view is the config's `strong_policy`
(the reference: its own RandAugment(3, 5) before crop and flip); the warm-up's negative entropy is on the logits'
softmax (the reference clamps the logits at 1e-12 first); 600 epochs where the reference's loop runs 601.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hrp_ood.config import TrainConfig
from hrp_ood.method import ramp_weight, sharpen, soft_cross_entropy
from hrp_ood.trainers.base import (
    EpochPlan,
    Member,
    StepContext,
    StepInputs,
    loss_precision,
    record_loss,
    shuffled_plan,
    update,
)
from hrp_ood.trainers.dividemix import (
    beta_sample,
    is_asymmetric,
    mixmatch,
    negative_entropy,
    noise_rate,
    per_sample_losses,
)

# FMix as the reference calls it (FMix() defaults): λ ~ Beta(1, 1), spectrum decay 1/f³, hard mask
FMIX_ALPHA = 1.0
FMIX_DECAY_POWER = 3.0

# ---- the reference code's hyper-parameters -------------------------------------------------------------------


def reference_values(cfg: TrainConfig) -> dict[str, Any]:
    """run.sh's settings: CIFAR-10 τ 0.99, debias 0.8/0.8; CIFAR-100 τ 0.95, debias 0.5/0.5; ρ 0.7 at ≤ 20% noise
    (symmetric), else 0.5 (sym50, asym40 and the CIFAR-N runs). The scripts have no run above 50% noise: sym80/90
    take sym50's ρ 0.5. Other datasets take CIFAR-10's values, a label file those of 50% noise."""
    cifar100 = cfg.dataset == "cifar100"
    rho = 0.7 if noise_rate(cfg) <= 0.2 and not is_asymmetric(cfg) else 0.5
    debias = 0.5 if cifar100 else 0.8
    return {
        "promix_rho_start": rho,
        "promix_rho_end": rho,
        "promix_tau": 0.95 if cifar100 else 0.99,
        "promix_debias_output": debias,
        "promix_debias_pl": debias,
    }


def projection_head(cfg: TrainConfig, net: nn.Module) -> nn.Module:
    """The pseudo head h_AP: a second linear classifier on the network's penultimate features."""
    return nn.Linear(net.num_features, net.num_classes)


# ---- schedules -------------------------------------------------------------------------------------------------


def selection_ratio(cfg: TrainConfig, epoch: int) -> float:
    """ρ = ρ_start + (ρ_end − ρ_start)·min(epoch / promix_ramp_epochs, 1) (epoch counted from 0, warm-up included)."""
    ramp = ramp_weight(epoch, 0, cfg.promix_ramp_epochs)
    return cfg.promix_rho_start + (cfg.promix_rho_end - cfg.promix_rho_start) * ramp


def unchosen_weight(cfg: TrainConfig, epoch: int) -> float:
    """β of the pseudo head's loss on the unchosen rows: base·min(epoch / (2·ramp), 1), and 0 from epoch 2·ramp on
    while that is below 1 (the reference's `beta = 0 if epoch >= 2*warmup_ep and beta < 1`); 1 when the
    pseudo-labels are not debiased (promix_debias_pl 0), as in the reference."""
    if cfg.promix_debias_pl == 0:
        return 1.0
    span = 2 * cfg.promix_ramp_epochs
    weight = cfg.promix_unchosen_weight * ramp_weight(epoch, 0, span)
    return 0.0 if epoch >= span and weight < 1 else weight


def guessing_active(cfg: TrainConfig, epoch: int) -> bool:
    """Label guessing by agreement runs in the epochs after epochs − promix_expand_epochs."""
    return epoch > cfg.epochs - cfg.promix_expand_epochs


# ---- selection -------------------------------------------------------------------------------------------------


def class_wise_small_loss(losses: torch.Tensor, labels: torch.Tensor, rho: float, num_classes: int) -> torch.Tensor:
    """CSS: per noisy class j, the max(min(⌈ρ·N/K⌉, N_j), 1) rows of smallest loss (N rows, K classes; an absent
    class chooses nothing). Returns a bool mask (N,)."""
    n = len(labels)
    quota = math.ceil(n * (1.0 / num_classes) * rho)  # the reference's expression, for the same rounding
    counts = torch.bincount(labels, minlength=num_classes)
    per_class = counts.clamp(max=quota).clamp(min=1)
    order = torch.argsort(losses, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # by class, each class by increasing loss
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=labels.device) - starts[labels[order]]
    return rank < per_class[labels]


def confident_on_label(probs: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """MHCS: the (unadjusted) probability of the given label exceeds τ."""
    return probs.gather(1, labels[:, None]).squeeze(1) > tau


def label_guessing(
    chosen: torch.Tensor, probs: tuple[torch.Tensor, torch.Tensor], tau: float, fill: float
) -> torch.Tensor:
    """LGA: rows not chosen where both networks' max probability exceeds τ and their predictions agree join the
    chosen set, highest mean max-probability first, until int(fill·B) rows are chosen (none if already as many)."""
    (score_a, pred_a), (score_b, pred_b) = (p.max(dim=1) for p in probs)
    candidates = (score_a > tau) & (score_b > tau) & (pred_a == pred_b) & ~chosen
    room = (int(len(chosen) * fill) - chosen.sum()).clamp(min=0)
    priority = torch.where(candidates, (score_a + score_b) / 2, torch.full_like(score_a, -math.inf))
    order = priority.argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return chosen | (candidates & (rank < room))


# ---- logit adjustment and the class prior --------------------------------------------------------------------


def adjusted_logits(logits: torch.Tensor, prior: torch.Tensor, tau: float) -> torch.Tensor:
    """The losses' logits z + τ·log π (the reference's debias_output)."""
    return logits + tau * prior.detach().log()


def debiased_probs(logits: torch.Tensor, prior: torch.Tensor, tau: float) -> torch.Tensor:
    """Pseudo-label probabilities softmax(z − τ·log π) (the reference's debias_pl)."""
    return (logits - tau * prior.detach().log()).softmax(dim=1)


def updated_prior(prior: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, momentum: float) -> torch.Tensor:
    """π ← m·π + (1 − m)·mean of the rows' probabilities; unchanged when no row is given."""
    count = rows.sum()
    mean = (probs.detach() * rows[:, None]).sum(dim=0) / count.clamp(min=1)
    return torch.where(count > 0, momentum * prior + (1 - momentum) * mean, prior)


def class_priors(ctx: StepContext, networks: int, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
    """π (chosen rows) and π^u (unchosen rows) of every network, (networks, K) each; uniform at first."""
    state = ctx.method_state
    for key in ("prior_chosen", "prior_unchosen"):
        if key not in state:
            state[key] = torch.full((networks, num_classes), 1.0 / num_classes, device=device)
    return state


# ---- FMix ------------------------------------------------------------------------------------------------------


class FMixed(NamedTuple):
    inputs: torch.Tensor
    perm: torch.Tensor
    lam: float


def fmix_mask(height: int, width: int, lam: float, decay_power: float = FMIX_DECAY_POWER) -> torch.Tensor:
    """FMix's binary mask (Harris et al. 2020), (height, width) float on the CPU: a random low-frequency image
    (Fourier coefficients ~ N(0, 1) scaled by 1 / max(f, 1/max(h, w))^decay) whose top ⌈λ·hw⌉ or ⌊λ·hw⌋ pixels
    (a fair coin) are 1. Draws from torch's CPU generator."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[: width // 2 + 1]
    freqs = (fx**2 + fy**2).sqrt()
    scale = 1.0 / freqs.clamp(min=1.0 / max(width, height)) ** decay_power
    param = torch.randn(*freqs.shape, 2, dtype=torch.float64)
    image = torch.fft.irfftn(torch.complex(scale * param[..., 0], scale * param[..., 1]), s=(height, width))
    size = height * width
    count = math.ceil(lam * size) if torch.rand(()).item() > 0.5 else math.floor(lam * size)
    mask = torch.zeros(size)
    mask[image.flatten().argsort(descending=True)[:count]] = 1.0
    return mask.view(height, width)


def fmix(inputs: torch.Tensor) -> FMixed:
    """mask·x + (1 − mask)·x[perm], one mask and one permutation for the batch, λ ~ Beta(1, 1) (no max(λ, 1 − λ))."""
    lam = beta_sample(FMIX_ALPHA)
    mask = fmix_mask(*inputs.shape[-2:], lam).to(inputs)
    perm = torch.randperm(len(inputs)).to(inputs.device)
    return FMixed(mask * inputs + (1 - mask) * inputs[perm], perm, lam)


def fmix_loss(logits: torch.Tensor, classes: torch.Tensor, mixed: FMixed) -> torch.Tensor:
    """λ·CE(logits, y) + (1 − λ)·CE(logits, y[perm]), each a batch mean."""
    return mixed.lam * F.cross_entropy(logits, classes) + (1 - mixed.lam) * F.cross_entropy(logits, classes[mixed.perm])


# ---- the epoch plan --------------------------------------------------------------------------------------------


def epoch_plan(ctx: StepContext, members: list[Member], data: Any, epoch: int) -> EpochPlan:
    """One shuffle of the training set in full batches of `batch_size` (the reference's loader, drop_last); after
    the warm-up, each network's own CSS as the per-step extra `chosen` (steps, networks, B) and the plan's state."""
    cfg = ctx.cfg
    num_samples = len(data.noisy_labels)
    plan = shuffled_plan(num_samples, min(cfg.batch_size, num_samples))
    if epoch < cfg.warmup_epochs:
        return plan
    rho = selection_ratio(cfg, epoch)
    chosen = torch.stack(
        [
            class_wise_small_loss(
                per_sample_losses(ctx, m, data.images, data.noisy_labels), data.noisy_labels, rho, data.num_classes
            )
            for m in members
        ]
    ).cpu()
    plan.extras["chosen"] = chosen[:, plan.index].transpose(0, 1).contiguous()
    plan.state["chosen"] = chosen
    return plan


# ---- the step --------------------------------------------------------------------------------------------------


def warmup_step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """CE of both networks on one weak view; asymmetric noise adds the negative entropy mean Σ p log p."""
    x = ctx.augment.weak(batch.images)
    with ctx.autocast():
        logits = [loss_precision(m.forward(x)) for m in members]
    per_sample = [F.cross_entropy(z, batch.noisy_labels, reduction="none") for z in logits]
    record_loss(ctx, batch, per_sample)
    loss_ce = torch.stack([ps.mean() for ps in per_sample]).sum()
    loss, logs = loss_ce, {"loss_ce": loss_ce.detach() / len(members)}
    if is_asymmetric(ctx.cfg):
        penalty = torch.stack([negative_entropy(z) for z in logits]).sum()
        loss = loss + penalty
        logs["loss_entropy"] = penalty.detach() / len(members)
    update(ctx, members, loss, {"loss": loss})
    return {"loss": loss.detach(), **logs}


class Heads(NamedTuple):
    """One network's logits on the step's weak and strong views, primary and pseudo head."""

    weak: torch.Tensor
    strong: torch.Tensor
    pseudo_weak: torch.Tensor
    pseudo_strong: torch.Tensor


def forward_heads(ctx: StepContext, member: Member, x_weak: torch.Tensor, x_strong: torch.Tensor) -> Heads:
    """Both heads on each view; the views in separate forwards (separate BatchNorm batches, as the reference)."""
    outputs = []
    for x in (x_weak, x_strong):
        with ctx.autocast():
            logits, features = member.forward(x, return_feature=True)
            outputs.append((loss_precision(logits), loss_precision(member.head_forward(features))))
    (weak, pseudo_weak), (strong, pseudo_strong) = outputs
    return Heads(weak, strong, pseudo_weak, pseudo_strong)


def pseudo_forward(ctx: StepContext, member: Member, x: torch.Tensor) -> torch.Tensor:
    with ctx.autocast():
        _, features = member.forward(x, return_feature=True)
        return loss_precision(member.head_forward(features))


def primary_forward(ctx: StepContext, member: Member, x: torch.Tensor) -> torch.Tensor:
    with ctx.autocast():
        return loss_precision(member.forward(x))


def masked_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the rows of the bool mask; 0 when there are none (the reference's NaN)."""
    return (values * rows).sum() / rows.sum().clamp(min=1)


class Selection(NamedTuple):
    chosen: torch.Tensor  # (B,) bool: the rows the network learns its labels from
    classes: torch.Tensor  # (B,) their target class: the given label, or (LGA rows) the debiased prediction


def select_rows(
    cfg: TrainConfig,
    base: torch.Tensor,
    probs: tuple[torch.Tensor, torch.Tensor],
    k: int,
    labels: torch.Tensor,
    guessed: torch.Tensor,
    guessing: bool,
) -> Selection:
    """Network k's chosen rows: its own CSS rows (`base`), plus MHCS on its own probabilities, plus LGA."""
    labeled = base | confident_on_label(probs[k], labels, cfg.promix_tau)
    chosen = label_guessing(labeled, probs, cfg.promix_tau, cfg.promix_expand_fill) if guessing else labeled
    return Selection(chosen, torch.where(labeled, labels, guessed))


def chosen_losses(
    ctx: StepContext,
    member: Member,
    pseudo_head: bool,
    weak: torch.Tensor,
    strong: torch.Tensor,
    x_weak: torch.Tensor,
    selection: Selection,
    prior: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One head's loss terms on the chosen rows: CE on the weak and strong views, Mixup, FMix (adjusted logits)."""
    cfg, rows = ctx.cfg, selection.chosen
    num_classes = weak.shape[1]
    targets = F.one_hot(selection.classes, num_classes).float()
    tau = cfg.promix_debias_output
    terms = {
        "ce": masked_mean(soft_cross_entropy(adjusted_logits(weak, prior, tau), targets), rows),
        "cr": masked_mean(soft_cross_entropy(adjusted_logits(strong, prior, tau), targets), rows),
    }
    zero = weak.sum() * 0
    if not bool(rows.any()):
        return {**terms, "mix": zero, "fmix": zero}
    forward = pseudo_forward if pseudo_head else primary_forward
    x_chosen, targets_chosen = x_weak[rows], targets[rows]
    mixed = mixmatch(x_chosen, targets_chosen, cfg.mixup_alpha)
    mix_logits = adjusted_logits(forward(ctx, member, mixed.inputs), prior, tau)
    terms["mix"] = soft_cross_entropy(mix_logits, mixed.targets).mean()
    fmixed = fmix(x_chosen)
    fmix_logits = adjusted_logits(forward(ctx, member, fmixed.inputs), prior, tau)
    terms["fmix"] = fmix_loss(fmix_logits, selection.classes[rows], fmixed)
    return terms


def unchosen_loss(
    cfg: TrainConfig, heads: Heads, unchosen: torch.Tensor, prior_unchosen: torch.Tensor, w: float
) -> torch.Tensor:
    """The pseudo head on the unchosen rows, logits adjusted by π^u, towards the primary head's sharpened debiased
    pseudo-labels sharpen(softmax(z − τ_pl·log π^u), T): CE on the weak view + w·CE on the strong view."""
    targets = sharpen(
        debiased_probs(heads.weak.detach(), prior_unchosen, cfg.promix_debias_pl), cfg.sharpen_temperature
    )
    tau = cfg.promix_debias_output
    weak = masked_mean(soft_cross_entropy(adjusted_logits(heads.pseudo_weak, prior_unchosen, tau), targets), unchosen)
    strong = masked_mean(
        soft_cross_entropy(adjusted_logits(heads.pseudo_strong, prior_unchosen, tau), targets), unchosen
    )
    return weak + w * strong


def member_loss(
    ctx: StepContext,
    member: Member,
    heads: Heads,
    x_weak: torch.Tensor,
    selection: Selection,
    priors: tuple[torch.Tensor, torch.Tensor],
    w: float,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Network k's loss: primary head + pseudo head (see the module docstring)."""
    prior, prior_unchosen = priors
    primary = chosen_losses(ctx, member, False, heads.weak, heads.strong, x_weak, selection, prior)
    pseudo = chosen_losses(ctx, member, True, heads.pseudo_weak, heads.pseudo_strong, x_weak, selection, prior)
    loss_unchosen = unchosen_loss(ctx.cfg, heads, ~selection.chosen, prior_unchosen, w)
    loss_primary = primary["ce"] + w * (primary["cr"] + primary["mix"] + primary["fmix"])
    loss_pseudo = beta * loss_unchosen + pseudo["ce"] + w * (pseudo["cr"] + pseudo["mix"] + pseudo["fmix"])
    return {
        "loss": loss_primary + loss_pseudo,
        "loss_primary": loss_primary,
        "loss_pseudo": loss_pseudo,
        "loss_ce": primary["ce"],
        "loss_cr": primary["cr"],
        "loss_mix": primary["mix"],
        "loss_fmix": primary["fmix"],
        "loss_unchosen": loss_unchosen,
        "chosen": selection.chosen.float().mean(),
    }


def step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """Warm-up CE, or one ProMix step of both networks (see the module docstring)."""
    if "chosen" not in batch.extras:
        return warmup_step(ctx, members, batch)
    cfg, labels = ctx.cfg, batch.noisy_labels
    epoch = int(batch.epoch)
    base = batch.extras["chosen"].to(labels.device)  # (networks, B): each network's own CSS rows
    x_weak, x_strong = ctx.augment.weak(batch.images), ctx.augment.strong(batch.images)
    heads = [forward_heads(ctx, m, x_weak, x_strong) for m in members]
    probs = tuple(h.weak.detach().softmax(dim=1) for h in heads)
    num_classes = probs[0].shape[1]
    state = class_priors(ctx, len(members), num_classes, labels.device)
    guessing = guessing_active(cfg, epoch)
    w = ramp_weight(epoch, 0, cfg.promix_ramp_epochs)
    beta = unchosen_weight(cfg, epoch)
    selections, per_member = [], []
    for k, m in enumerate(members):
        priors = (state["prior_chosen"][k], state["prior_unchosen"][k])
        guessed = debiased_probs(heads[k].weak.detach(), priors[0], cfg.promix_debias_pl).argmax(dim=1)
        selection = select_rows(cfg, base[k], probs, k, labels, guessed, guessing)
        selections.append(selection)
        per_member.append(member_loss(ctx, m, heads[k], x_weak, selection, priors, w, beta))
    momentum = cfg.promix_prior_momentum
    state["prior_chosen"] = torch.stack(
        [updated_prior(state["prior_chosen"][k], probs[k], s.chosen, momentum) for k, s in enumerate(selections)]
    )
    state["prior_unchosen"] = torch.stack(
        [updated_prior(state["prior_unchosen"][k], probs[k], ~s.chosen, momentum) for k, s in enumerate(selections)]
    )
    loss = torch.stack([t["loss"] for t in per_member]).sum()
    update(ctx, members, loss, {key: torch.stack([t[key] for t in per_member]) for key in per_member[0]})
    if ctx.signals is not None:
        record_loss(ctx, batch, [F.cross_entropy(h.weak.detach(), labels, reduction="none") for h in heads])
        # 1 / 0.5 / 0: chosen by both networks, by one, by neither
        ctx.signals.record("selection", batch.index, torch.stack([s.chosen.float() for s in selections]).mean(dim=0))
    logs = {key: torch.stack([t[key].detach() for t in per_member]).mean() for key in per_member[0] if key != "loss"}
    logs.update(
        loss=loss.detach(),
        rho=torch.tensor(selection_ratio(cfg, epoch), device=loss.device),
        w=torch.tensor(w, device=loss.device),
        beta_unchosen=torch.tensor(beta, device=loss.device),
    )
    return logs
