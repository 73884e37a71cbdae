"""L2B, "Learning to Bootstrap" (Zhou et al., CVPR 2024; reference code yuyinzhou/L2B @ 1f73e29, main.py): one
network that learns, per sample, how much to trust the given label ỹ and its own hard pseudo-label ŷ.

Each step after the plain-CE warm-up, for the batch's logits y (train mode) and ŷ = argmax y:

    C = [CE(y, ỹ); CE(y, ŷ)]                          (2, B)
    θ'(ε) = one step of the REAL optimizer on Σ ε ⊙ C  (its lr, momentum buffers and weight decay), ε = 0
    L_meta(ε) = mean CE of a clean meta batch at θ'(ε)  (BN in train mode)
    w̃ = max(−∂L_meta/∂ε, 0),  w = w̃ / (Σ_{2B} w̃ + 1e-10)  (ONE normaliser over both rows)
    loss = Σ w ⊙ C                                    (a sum: the weights already sum to 1)

then the real step with the gradient norm clipped to `grad_clip`. The reference differentiates through the virtual
step (the `higher` library); here the same number comes from one reverse pass and one forward-mode pass: with
g = ∇_θ Σ ε ⊙ C, θ' depends on ε only through g (linearly), so ∂L_meta/∂ε_ki = ⟨u, ∇_θ C_ki⟩ with
u = (∂θ'/∂g)ᵀ ∇_θ' L_meta(θ'(0)), and ⟨u, ∇_θ C_ki⟩ = (softmax(y_i) − onehot(label_k,i)) · (∂y_i/∂θ) u. The momentum
and weight decay move the point θ'(0) = θ − lr (μ buf + wd θ) where the meta gradient is taken; HRP's meta step
(method/reliability.py) takes it at θ (plain SGD) and normalises α and β separately.

Every meta forward (the batch's and the meta batch's) runs on cloned BN buffers: the running statistics change only
in the real training forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hrp_ood.config import TrainConfig
from hrp_ood.distributed import global_count, global_mean_of_grads, world_size
from hrp_ood.method import normalize_reliabilities
from hrp_ood.method.reliability import (
    _grads_or_zeros,
    _meta_logits,
    _preserved_modes,
    _trainable_parameters,
    logit_changes,
    signed_alignment,
)
from hrp_ood.trainers.base import Member, StepContext, StepInputs, loss_precision, record_loss, update
from hrp_ood.trainers.baselines import ce_step
from hrp_ood.trainers.signals import batch_auroc

L2B_DELTA = 1e-10  # the reference's guard in w̃ / (Σ w̃ + δ)


def reference_values(cfg: TrainConfig) -> dict[str, float]:
    """The reference's gradient-norm clip (its README's commands): 0.80 on CIFAR-100, else CIFAR-10's 0.25."""
    return {"grad_clip": 0.80 if cfg.dataset == "cifar100" else 0.25}


def step(ctx: StepContext, members: list[Member], batch: StepInputs) -> dict[str, torch.Tensor]:
    """Plain CE during the warm-up, then L2B's reweighted step; the gradient norm is clipped in both (as the
    reference does)."""
    (member,) = members
    with clipped_gradients(member, ctx.cfg.grad_clip) as norms:
        if batch.epoch < ctx.cfg.warmup_epochs:
            logs = ce_step(ctx, members, batch)
        else:
            logs = _l2b_step(ctx, member, batch)
    if norms:
        logs["grad_norm"] = norms[0]
    return logs


def _l2b_step(ctx: StepContext, member: Member, batch: StepInputs) -> dict[str, torch.Tensor]:
    x = ctx.augment.weak(batch.images)
    meta_x, meta_y = ctx.sample_meta_batch()
    pseudo, signed = l2b_meta_gradients(member.net, member.optimizer, x, batch.noisy_labels, meta_x, meta_y)
    weights = l2b_weights(signed)
    with ctx.autocast():
        logits = loss_precision(member.forward(x))
    costs = torch.stack(
        [
            F.cross_entropy(logits, batch.noisy_labels, reduction="none"),
            F.cross_entropy(logits, pseudo, reduction="none"),
        ]
    )
    # Σ over the global batch, no 1/B; this rank's loss is W × its share (hrp_ood.distributed's convention)
    loss = world_size() * (weights * costs).sum()
    update(ctx, [member], loss, {"loss": loss})
    _record_signals(ctx, batch, weights, costs[0], pseudo)
    logs = {
        "loss": loss.detach(),
        "weight_given": weights[0].sum() / weights.sum(),  # share of the weight on the given labels (NaN: none)
        "weight_nonzero": (weights > 0).float().mean(),
    }
    if batch.clean_labels is not None:
        logs["alpha_auroc_batch"] = batch_auroc(weights[0], batch.noisy_labels == batch.clean_labels)
    return logs


def l2b_weights(signed: torch.Tensor) -> torch.Tensor:
    """w (2, n) from −∂L_meta/∂ε: clamped at 0, then divided by their sum over both rows and the whole (global)
    batch, so Σ w = 1 (all zero when no entry is positive). That is Table 4's coupled normalisation (HRP's
    "Coupled Meta") divided by its total mass 2n."""
    alpha, beta = normalize_reliabilities(signed[0].clamp_min(0), signed[1].clamp_min(0), "coupled", L2B_DELTA)
    return torch.stack([alpha, beta]) / (2 * global_count(signed.shape[1]))


def l2b_meta_gradients(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    labels: torch.Tensor,
    meta_x: torch.Tensor,
    meta_y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pseudo-labels ŷ = argmax of the batch's train-mode logits at θ, and −∂L_meta/∂ε (2, n) at ε = 0 for
    ε weighting [CE(y, labels); CE(y, ŷ)] in a virtual step of `optimizer` (module docstring). No `.grad`, no
    running statistic and no optimizer state changes; each module's train/eval flag is restored."""
    with _preserved_modes(net), torch.enable_grad():
        direction = _meta_direction(net, optimizer, meta_x, meta_y)
        logits, dlogits = logit_changes(net, x, direction)
    pseudo = logits.argmax(dim=1)
    signed = -torch.stack([signed_alignment(logits, dlogits, labels), signed_alignment(logits, dlogits, pseudo)])
    return pseudo, signed.detach()


def _meta_direction(
    net: nn.Module, optimizer: torch.optim.Optimizer, meta_x: torch.Tensor, meta_y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """u = (∂θ'/∂g)ᵀ ∇_θ' L_meta at θ' = the optimizer's virtual step with gradient g = 0 (the meta batch in train
    mode on cloned buffers); the mean over ranks (equal meta slices)."""
    params = _trainable_parameters(net)
    zero_grads = {name: torch.zeros_like(p, requires_grad=True) for name, p in params.items()}
    stepped = virtual_sgd_step(optimizer, params, zero_grads)
    meta_loss = F.cross_entropy(_meta_logits(net, stepped, meta_x, batch_stats=True), meta_y)
    direction = _grads_or_zeros(meta_loss, zero_grads, create_graph=False)
    return global_mean_of_grads({name: d.detach() for name, d in direction.items()})


def virtual_sgd_step(
    optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], grads: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The parameters `optimizer.step()` (torch.optim.SGD) would make of `params` with gradients `grads`, as a
    differentiable function of `grads`; neither the parameters nor the optimizer's state change:

        d = g + wd θ;  buf = μ buf + (1 − dampening) d  (buf = d at the first step);
        d = d + μ buf (nesterov) or buf;  θ' = θ − lr d.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"L2B's virtual step follows torch.optim.SGD, got {type(optimizer).__name__}")
    group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
    stepped = {}
    for name, p in params.items():
        group = group_of[p]
        theta = p.detach()
        d = -grads[name] if group["maximize"] else grads[name]
        if group["weight_decay"] != 0:
            d = d + group["weight_decay"] * theta
        momentum = group["momentum"]
        if momentum != 0:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            buf = d if buf is None else momentum * buf + (1 - group["dampening"]) * d
            d = d + momentum * buf if group["nesterov"] else buf
        stepped[name] = theta - group["lr"] * d
    return stepped


@contextlib.contextmanager
def clipped_gradients(member: Member, max_norm: float | None) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every step of the member's optimizer first clips its network's gradient norm to `max_norm`
    (the reference's clip_grad_norm_ between backward and step; `update` does both). Yields the list that receives
    each step's norm before clipping. None or 0: no clipping (the reference's clipping_norm 0)."""
    norms: list[torch.Tensor] = []
    if not max_norm:
        yield norms
        return

    def clip(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        norms.append(nn.utils.clip_grad_norm_(member.net.parameters(), max_norm))

    handle = member.optimizer.register_step_pre_hook(clip)
    try:
        yield norms
    finally:
        handle.remove()


def _record_signals(
    ctx: StepContext, batch: StepInputs, weights: torch.Tensor, given_ce: torch.Tensor, pseudo: torch.Tensor
) -> None:
    """alpha = w on the given label (metrics.csv's alpha_auroc: do L2B's weights find the clean labels?), beta = w
    on the pseudo-label, and the small-loss signal."""
    record_loss(ctx, batch, [given_ce])
    if ctx.signals is None:
        return
    ctx.signals.record("alpha", batch.index, weights[0])
    ctx.signals.record("beta", batch.index, weights[1])
    if batch.clean_labels is not None:
        ctx.signals.record("pseudo_correct", batch.index, (pseudo == batch.clean_labels).float())
