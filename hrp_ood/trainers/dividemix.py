"""DivideMix (Li, Socher & Hoi, ICLR 2020; LiJunnan1992/DivideMix @ d9d3058, Train_cifar.py).

Two networks. Warm-up: plain CE per network on the whole set. Every later epoch, before training, each network's
per-sample CE over the training set (test transform, eval mode) is min–max normalised and fitted by a two-component
GMM; a sample's clean probability is the posterior of the lower-mean component. CO-DIVIDE: network 1 trains on
network 2's division (labeled = prob > p_threshold, the rest unlabeled) and network 2 on network 1's. Each network's
pass: co-guessed targets for the unlabeled rows (both networks, both weak views), co-refined targets for the labeled
rows (its own views, weighted by the peer's clean probability), MixMatch over all of them, Lx + λ·Lu + the uniform-
prior penalty. Test: the sum of the two networks' logits (registry test_rule "sum").

The MixMatch pieces are public and stable (UNICON and LongReMix reuse them): `gmm_clean_probability`, `co_guess`,
`co_refine`, `mixmatch`, `mixmatch_losses`, `lambda_u_weight`, `semi_supervised_loss`, `mixmatch_member_loss`.

Plan of a post-warm-up epoch (`epoch_plan`): network 1's pass, then network 2's pass, each of ceil(|L| / B) steps
of B labeled rows (the reference's labeled loader; its last partial batch is completed with the first rows of a
fresh shuffle of L, so every batch has B rows) and B unlabeled rows drawn in turn from fresh shuffles of U (the
reference's `next(unlabeled_iter)` restarting its loader). The λu ramp's fraction is i / (|L| // B + 1) as in the
reference. Per-step extras: `net` (which network trains), `unlabeled` (rows), `has_unlabeled`, `weight` (the
labeled rows' clean probability from the peer's GMM), `epoch_time` (epoch + fraction, for the λu ramp), `first`
(the step that records the epoch's per-sample `selection` signal: the mean of the two networks' GMM probability).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import betaincinv
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from hrp_ood.config import TrainConfig
from hrp_ood.method import prior_penalty, ramp_weight, sharpen, soft_cross_entropy
from hrp_ood.trainers.base import (
    EpochPlan,
    Member,
    StepContext,
    StepInputs,
    cycled_batches,
    loss_precision,
    record_loss,
    update,
)

# ---- the reference code's hyper-parameters -------------------------------------------------------------------


def reference_values(cfg: TrainConfig) -> dict[str, Any]:
    """λu, p_threshold and the GMM's loss window of Train_cifar.py's runs for the dataset and noise level
    (paper appendix; maintainer replies in issues #10, #41, #50). Other datasets take CIFAR-10's values; a label
    file (cfg.noisy_labels) those of 50% noise."""
    rate = noise_rate(cfg)
    if cfg.dataset == "cifar100":
        lambda_u = 25.0 if rate <= 0.2 else 150.0
    elif is_asymmetric(cfg) or rate <= 0.2:
        lambda_u = 0.0
    else:
        lambda_u = 50.0 if rate >= 0.9 else 25.0
    return {
        "lambda_u": lambda_u,
        "p_threshold": 0.6 if rate >= 0.9 else 0.5,
        "gmm_loss_epochs": 5 if rate >= 0.9 else 1,
    }


def noise_rate(cfg: TrainConfig) -> float:
    """The nominal rate of the noise spec (the reference's `--r`); 0.5 for a label file."""
    from hrp_ood.data.noise import parse_noise

    return 0.5 if cfg.noisy_labels else parse_noise(cfg.noise).rate


def is_asymmetric(cfg: TrainConfig) -> bool:
    from hrp_ood.data.noise import parse_noise

    return not cfg.noisy_labels and parse_noise(cfg.noise).mode == "asym"


# ---- the public MixMatch pieces (UNICON and LongReMix import these) -------------------------------------------


def normalized_losses(losses: torch.Tensor) -> torch.Tensor:
    """Min–max normalisation over the set: (l − min) / (max − min); all zeros when every loss is equal (the
    reference divides by zero there)."""
    losses = losses.double()
    low, span = losses.min(), losses.max() - losses.min()
    return (losses - low) / span if span > 0 else torch.zeros_like(losses)


def gmm_clean_probability(losses: torch.Tensor, seed: int) -> torch.Tensor:
    """Posterior probability of the LOWER-mean component of a two-component 1-D Gaussian mixture fitted to
    `losses` (N,) — the reference's GaussianMixture(2, max_iter=10, tol=1e-2, reg_covar=5e-4), seeded with
    `seed` (random_state). Returns (N,) float32 on the losses' device; higher = judged clean."""
    values = losses.detach().double().cpu().numpy().reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=seed)
    with warnings.catch_warnings():  # 10 EM iterations is the reference's choice, not a failure
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(values)
    prob = gmm.predict_proba(values)[:, int(np.argmin(gmm.means_.ravel()))]
    return torch.from_numpy(prob).float().to(losses.device)


def co_guess(logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """Co-guessed targets of unlabeled rows: the mean of softmax over every given logits (DivideMix: both
    networks × both weak views), sharpened p^(1/T) and renormalised. Detached."""
    probs = torch.stack([z.detach().float().softmax(dim=1) for z in logits]).mean(dim=0)
    return sharpen(probs, temperature)


def co_refine(
    logits: Sequence[torch.Tensor], labels: torch.Tensor, weight: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Co-refined targets of labeled rows: w·onehot(label) + (1 − w)·mean softmax of the given logits (DivideMix:
    the trained network's two weak views), sharpened p^(1/T) and renormalised. `weight` (n,) is the clean
    probability. Detached."""
    probs = torch.stack([z.detach().float().softmax(dim=1) for z in logits]).mean(dim=0)
    w = weight.detach().float()[:, None]
    one_hot = F.one_hot(labels, probs.shape[1]).float()
    return sharpen(w * one_hot + (1 - w) * probs, temperature)


class Mixed(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor
    lam: float  # the weight of the unpermuted rows, >= 0.5


def beta_sample(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw of Beta(α, α) from torch's (seeded, checkpointed) CPU generator: the inverse CDF of a uniform."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return float(betaincinv(alpha, alpha, u))


def mixmatch(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> Mixed:
    """MixMatch's mixup: l ~ Beta(α, α), l = max(l, 1 − l), ONE permutation over all rows (labeled and unlabeled
    rows mix together): l·(x, y) + (1 − l)·(x, y)[perm]. `generator`: a CPU torch generator (None: the global one)."""
    lam = beta_sample(alpha, generator)
    lam = max(lam, 1 - lam)
    perm = torch.randperm(len(inputs), generator=generator).to(inputs.device)
    return Mixed(lam * inputs + (1 - lam) * inputs[perm], lam * targets + (1 - lam) * targets[perm], lam)


def mixmatch_losses(
    logits_x: torch.Tensor, targets_x: torch.Tensor, logits_u: torch.Tensor, targets_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Lx, Lu): Lx = mean soft cross-entropy of the labeled rows; Lu = mean squared error between softmax and
    targets averaged over rows AND classes (0 without unlabeled rows)."""
    loss_x = soft_cross_entropy(logits_x, targets_x).mean()
    if len(logits_u) == 0:
        return loss_x, logits_x.sum() * 0
    loss_u = (logits_u.softmax(dim=1) - targets_u).pow(2).mean()
    return loss_x, loss_u


def lambda_u_weight(lambda_u: float, epoch: float, warmup_epochs: float, ramp_epochs: float) -> float:
    """λ = λu · clip((epoch − warm_up) / ramp, 0, 1), `epoch` fractional (epoch + i / iters): the reference's
    linear_rampup with rampup_length = ramp_epochs (16 in the reference)."""
    return lambda_u * ramp_weight(epoch, warmup_epochs, ramp_epochs)


def semi_supervised_loss(
    logits: torch.Tensor, mixed_targets: torch.Tensor, labeled_rows: int, lambda_weight: float
) -> dict[str, torch.Tensor]:
    """DivideMix's loss of one mixed batch whose first `labeled_rows` rows are the labeled ones:
    Lx + λ·Lu + Σ_c (1/C) log((1/C) / mean_i p_ic) (the uniform-prior penalty over ALL mixed rows, always on).
    Returns the terms: loss (with grad), loss_x, loss_u, loss_prior."""
    loss_x, loss_u = mixmatch_losses(
        logits[:labeled_rows], mixed_targets[:labeled_rows], logits[labeled_rows:], mixed_targets[labeled_rows:]
    )
    penalty = prior_penalty(logits)
    return {
        "loss": loss_x + lambda_weight * loss_u + penalty,
        "loss_x": loss_x,
        "loss_u": loss_u,
        "loss_prior": penalty,
    }


@contextmanager
def peer_in_eval_mode(member: Member, peer: Member):
    """The trained network in train mode, its peer in eval mode ("fix one network and train the other"); the
    peer's mode is restored afterwards."""
    was_training = peer.net.training
    member.net.train()
    peer.net.eval()
    try:
        yield
    finally:
        peer.net.train(was_training)


def mixmatch_member_loss(
    ctx: StepContext,
    member: Member,
    peer: Member,
    labeled_views: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    weight: torch.Tensor,
    unlabeled_views: tuple[torch.Tensor, torch.Tensor] | None,
    lambda_weight: float,
    *,
    labeled_mix_views: tuple[torch.Tensor, torch.Tensor] | None = None,
    unlabeled_mix_views: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One network's DivideMix loss (not yet stepped): targets from the views given (co-guessing: both networks on
    both unlabeled views; co-refinement: the member's own two labeled views, weighted by `weight`), under no_grad
    but with the member in TRAIN mode (its BN running statistics update, as in the reference) and the peer in eval
    mode; then MixMatch over [x1, x2, u1, u2] (or the `*_mix_views`, e.g. UNICON's strong views) and one forward
    with grad. `unlabeled_views` None: the labeled rows mix alone (Lu = 0). Returns `semi_supervised_loss`'s terms
    plus `lam`. The caller sets nothing: modes are set here and the peer's restored."""
    cfg = ctx.cfg
    with peer_in_eval_mode(member, peer), torch.no_grad(), ctx.autocast():
        targets_u = None
        if unlabeled_views is not None:
            # separate forwards, as the reference: each view is its own batch for BN's train-mode statistics
            own_u = [loss_precision(member.forward(u)) for u in unlabeled_views]
            peer_u = loss_precision(peer.forward(torch.cat(unlabeled_views))).chunk(2)  # eval mode: rows independent
            targets_u = co_guess([*own_u, *peer_u], cfg.sharpen_temperature)
        own_x = [loss_precision(member.forward(x)) for x in labeled_views]
        targets_x = co_refine(own_x, labels, weight, cfg.sharpen_temperature)
    x_mix = labeled_mix_views or labeled_views
    inputs, targets = [*x_mix], [targets_x, targets_x]
    if targets_u is not None:
        inputs += [*(unlabeled_mix_views or unlabeled_views)]
        targets += [targets_u, targets_u]
    mixed = mixmatch(torch.cat(inputs), torch.cat(targets), cfg.mixup_alpha)
    with ctx.autocast():
        logits = loss_precision(member.forward(mixed.inputs))
    terms = semi_supervised_loss(logits, mixed.targets, 2 * len(labels), lambda_weight)
    terms["lam"] = torch.tensor(mixed.lam, device=logits.device)
    return terms


# ---- the epoch plan -------------------------------------------------------------------------------------------


def shuffled_cycle(rows: torch.Tensor, steps: int, batch_size: int) -> torch.Tensor:
    """(steps, batch_size) rows taken in turn from fresh shuffles of `rows` (a loader re-iterated with
    shuffle=True; a pass's last partial batch is completed by the next shuffle's first rows). CPU generator."""
    shuffles = max(1, math.ceil(steps * batch_size / len(rows)))
    order = torch.cat([rows[torch.randperm(len(rows))] for _ in range(shuffles)])
    return cycled_batches(order, steps, batch_size)


def warmup_plan(num_samples: int, batch_size: int, networks: int) -> EpochPlan:
    """Network 1's pass over the whole set, then network 2's, each in its own shuffle, in batches of
    2 × batch_size (the reference's warm-up loader); the last partial batch is completed from a fresh shuffle."""
    steps = math.ceil(num_samples / batch_size)
    everything = torch.arange(num_samples)
    index = torch.cat([shuffled_cycle(everything, steps, batch_size) for _ in range(networks)])
    net = torch.arange(networks).repeat_interleave(steps)
    return EpochPlan(index, extras={"net": net, "first": first_step_flags(len(net))})


def first_step_flags(steps: int) -> torch.Tensor:
    """True at the plan's first step only: where the step records the epoch's per-sample signals."""
    return torch.arange(steps) == 0


def labeled_mask(prob: torch.Tensor, threshold: float, minimum: int) -> torch.Tensor:
    """prob > threshold; if that is fewer than `minimum` rows (the reference crashes on an empty labeled set), the
    `minimum` rows of highest clean probability."""
    mask = prob > threshold
    if int(mask.sum()) >= minimum:
        return mask
    mask = torch.zeros_like(mask)
    mask[prob.topk(min(minimum, len(prob))).indices] = True
    return mask


def member_pass(
    net: int,
    labeled: torch.Tensor,
    prob: torch.Tensor,
    batch_size: int,
    epoch: float,
    steps: int | None = None,
) -> dict[str, torch.Tensor]:
    """The steps of network `net` on the division (`labeled` mask, clean probability `prob`) it was given.
    `steps` None: ceil(|L| / B), one pass over L (DivideMix); more: L re-shuffled and cycled (LongReMix). The λu
    ramp's fraction is (i mod steps per pass of L) / (|L| // B + 1), the reference's batch_idx / num_iter."""
    labeled_rows = labeled.nonzero().squeeze(1).cpu()
    unlabeled_rows = (~labeled).nonzero().squeeze(1).cpu()
    per_pass = math.ceil(len(labeled_rows) / batch_size)
    steps = per_pass if steps is None else steps
    index = shuffled_cycle(labeled_rows, steps, batch_size)
    has_unlabeled = len(unlabeled_rows) > 0
    unlabeled = shuffled_cycle(unlabeled_rows, steps, batch_size) if has_unlabeled else index.clone()
    fraction = (torch.arange(steps) % per_pass).double() / (len(labeled_rows) // batch_size + 1)
    return {
        "index": index,
        "net": torch.full((steps,), net, dtype=torch.long),
        "unlabeled": unlabeled,
        "has_unlabeled": torch.full((steps,), has_unlabeled),
        "weight": prob.cpu()[index].float(),
        "epoch_time": epoch + fraction,
    }


def co_divide_plan(
    probs: Sequence[torch.Tensor],
    labeled: Sequence[torch.Tensor],
    batch_size: int,
    epoch: float,
    steps: Sequence[int | None] = (None, None),
) -> EpochPlan:
    """CO-DIVIDE: network k trains on network (1 − k)'s division and clean probability; network 1's pass first."""
    passes = [member_pass(k, labeled[1 - k], probs[1 - k], batch_size, epoch, steps[k]) for k in range(len(probs))]
    index = torch.cat([p.pop("index") for p in passes])
    extras = {key: torch.cat([p[key] for p in passes]) for key in passes[0]}
    extras["first"] = first_step_flags(len(index))
    return EpochPlan(index, extras=extras)


def per_sample_losses(ctx: StepContext, member: Member, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE of every training sample on its noisy label: eval mode, test transform, no shuffle."""
    net = member.net
    was_training = net.training
    net.eval()
    losses = []
    with torch.no_grad(), ctx.autocast():
        for start in range(0, len(images), ctx.cfg.eval_batch_size):
            x = ctx.augment.normalize(images[start : start + ctx.cfg.eval_batch_size])
            logits = loss_precision(net(x))
            losses.append(F.cross_entropy(logits, labels[start : start + len(x)], reduction="none"))
    net.train(was_training)
    return torch.cat(losses)


def gmm_seed(seed: int, epoch: int, net: int) -> int:
    return (seed * 1_000_003 + epoch * 2 + net) % 2**32


def clean_probabilities(ctx: StepContext, members: list[Member], data: Any, epoch: int) -> list[torch.Tensor]:
    """Each network's GMM clean probability of every training sample (eval_train of the reference). With
    gmm_loss_epochs > 1 (90% noise) the GMM fits the mean of the last that many epochs' normalised losses (the
    history is `method_state["loss_history"]`, (networks, epochs kept, N)). Keeps what the epoch's first step
    records as signals: `selection` (the mean of the networks' probabilities) and `eval_loss`."""
    cfg, state = ctx.cfg, ctx.method_state
    raw = [per_sample_losses(ctx, m, data.images, data.noisy_labels) for m in members]
    normalized = torch.stack([normalized_losses(loss) for loss in raw]).float()[:, None]
    history = state.get("loss_history")
    history = normalized if history is None else torch.cat([history.to(normalized.device), normalized], dim=1)
    history = history[:, -cfg.gmm_loss_epochs :]
    if cfg.gmm_loss_epochs > 1:
        state["loss_history"] = history
    probs = [gmm_clean_probability(history[k].mean(dim=0), gmm_seed(cfg.seed, epoch, k)) for k in range(len(members))]
    state["selection"] = torch.stack(probs).mean(dim=0)
    state["eval_loss"] = torch.stack(raw).float().mean(dim=0)
    return probs


def epoch_plan(ctx: StepContext, members: list[Member], data: Any, epoch: int) -> EpochPlan:
    """Warm-up: each network's CE pass. Later: both networks' GMMs first, then co-divided passes (see module)."""
    cfg = ctx.cfg
    if epoch < cfg.warmup_epochs:
        return warmup_plan(len(data.noisy_labels), 2 * cfg.batch_size, len(members))
    probs = clean_probabilities(ctx, members, data, epoch)
    labeled = [labeled_mask(p, cfg.p_threshold, cfg.batch_size) for p in probs]
    return co_divide_plan(probs, labeled, cfg.batch_size, epoch)


# ---- the step -------------------------------------------------------------------------------------------------


def warmup_step(ctx: StepContext, member: Member, batch: StepInputs) -> dict[str, torch.Tensor]:
    """CE of one network on a weak view of its batch; asymmetric noise adds the negative entropy mean Σ p log p."""
    member.net.train()
    with ctx.autocast():
        logits = loss_precision(member.forward(ctx.augment.weak(batch.images)))
    per_sample = F.cross_entropy(logits, batch.noisy_labels, reduction="none")
    record_loss(ctx, batch, [per_sample])
    loss = per_sample.mean()
    terms = {"loss_ce": loss.detach()}
    if is_asymmetric(ctx.cfg):
        terms["loss_entropy"] = negative_entropy(logits)
        loss = loss + terms["loss_entropy"]
    update(ctx, [member], loss, {"loss": loss})
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """mean_i Σ_c p_ic log p_ic (the reference's NegEntropy: penalises confident predictions)."""
    log_p = logits.log_softmax(dim=1)
    return (log_p.exp() * log_p).sum(dim=1).mean()


def record_epoch_signals(ctx: StepContext) -> None:
    """The epoch's GMM clean probability (mean over the networks) as `selection` and the eval pass's CE as `loss`,
    for every training sample (the signals object exists only once the epoch's steps start)."""
    state = ctx.method_state
    if ctx.signals is None or "selection" not in state:
        return
    every = torch.arange(len(state["selection"]), device=state["selection"].device)
    ctx.signals.record("selection", every, state["selection"])
    ctx.signals.record("loss", every, state["eval_loss"])


def planned_members(ctx: StepContext, members: list[Member], batch: StepInputs) -> tuple[Member, Member]:
    """The network the plan's step trains and its peer; the epoch's signals are recorded at its first step."""
    k = int(batch.extras["net"])
    if bool(batch.extras["first"]):
        record_epoch_signals(ctx)
    return members[k], members[1 - k]


def step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """One step of the network the plan names: warm-up CE, or its DivideMix pass (see module)."""
    extras = batch.extras
    member, peer = planned_members(ctx, members, batch)
    if "unlabeled" not in extras:
        return warmup_step(ctx, member, batch)
    cfg = ctx.cfg
    weak = ctx.augment.weak
    x_views = (weak(batch.images), weak(batch.images))
    u_views = None
    if bool(extras["has_unlabeled"]):
        u_images = ctx.train_images[extras["unlabeled"].to(batch.images.device)]
        u_views = (weak(u_images), weak(u_images))
    lam_u = lambda_u_weight(cfg.lambda_u, float(extras["epoch_time"]), cfg.warmup_epochs, cfg.ramp_epochs)
    weight = extras["weight"].to(batch.images.device)
    terms = mixmatch_member_loss(ctx, member, peer, x_views, batch.noisy_labels, weight, u_views, lam_u)
    update(ctx, [member], terms["loss"], terms)
    logs = {key: value.detach() for key, value in terms.items()}
    logs["lambda_u"] = torch.tensor(lam_u, device=logs["loss"].device)
    return logs
