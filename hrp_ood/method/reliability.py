"""Disentangled sample reliabilities by bilevel meta-learning (SPEC §3.1, Eqs. 1–5).

For a mini-batch (x_i, ỹ_i, ŷ_i) and a clean meta batch (x^meta_j, y^meta_j):

    (1) L_ε(θ)    = (1/n) Σ_i [ε^α_i ℓ(f_θ(x_i), ỹ_i) + ε^β_i ℓ(f_θ(x_i), ŷ_i)],   ε = 0
    (2) θ̂(ε)     = θ − η ∇_θ L_ε(θ)
    (3) L_meta(ε) = (1/m) Σ_j ℓ(f_θ̂(ε)(x^meta_j), y^meta_j)          (BN in eval mode, or see meta_bn)
    (4) α̃_i = max(−∂L_meta/∂ε^α_i, 0),  β̃_i = max(−∂L_meta/∂ε^β_i, 0)   at ε = 0
    (5) α_i = n α̃_i / (Σ_k α̃_k + δ),   β_i = n β̃_i / (Σ_k β̃_k + δ)

Since ε = 0 gives θ̂ = θ, the chain rule collapses to an inner product of gradients:

    −∂L_meta/∂ε_i = (η/n) ⟨∇_θ L_meta(θ), ∇_θ ℓ_i(θ)⟩,

which the default ``method="jvp"`` evaluates with one reverse pass (v = ∇_θ L_meta) and one
forward-mode pass of the train-mode logits along v. ``method="double_backward"`` differentiates
through the virtual SGD step as Learning-to-Reweight / L2B do; both give the same numbers.

Both methods run the per-sample losses of Eq. 1 in train mode (batch statistics, like L2B's
virtual step) on *cloned* buffers, so the model's BN running statistics never change, and the
meta loss in eval mode (``meta_bn="batch"``: in train mode on cloned buffers too). Nothing is written
to ``.grad`` and every module's train/eval flag is restored on exit.

``calibrated=True`` (config ``meta_calibration``, not in SPEC) takes the meta loss at the meta batch's
temperature scaling: L*_meta(θ̂) = min_{s,b} (1/m) Σ_j ℓ(s f_θ̂(x^meta_j) + b, y^meta_j), with (s, b) fitted at θ
(`fit_calibration`) and held fixed — by the envelope theorem that is the derivative of L*_meta. Its gradient has
no logit-scale or class-shift component, so α no longer measures how the step moves the networks' confidence
(which rewards predicted labels when the nets are under-confident and the other labels when over-confident).

Data-parallel (`hrp_ood.distributed`, identities in one process): the batch of n samples and the meta
batch are spread over the ranks. v = ∇L_meta is the mean of the ranks' meta gradients (equal meta
slices), n in η/n and in Eq. 5 is the global batch size and Σ_k runs over every rank's samples, so
every rank gets the α, β one process would compute for its samples. With synchronised BN
(`GlobalBatchNorm`) the train-mode forward of Eq. 1 uses the global batch statistics, as one process does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hrp_ood.distributed import all_gather, global_count, global_mean_of_grads, global_sum, rank, world_size
from hrp_ood.errors import UserError
from hrp_ood.method.targets import weighted_label_ce

NORMALIZATIONS = ("separate", "coupled")
METHODS = ("jvp", "double_backward")
# BatchNorm in the meta forward (Eq. 3): running statistics (the paper's eval mode; "eval_weak_stats" is the same
# here, the trainer only changes what feeds the running statistics) or the meta batch's own statistics on cloned
# buffers ("batch", as L2RW, Meta-Weight-Net and L2B): either way the running statistics never change
META_BN_MODES = ("eval", "batch", "eval_weak_stats")


@dataclass
class Reliabilities:
    """Per-sample reliabilities of one batch, all (n,) detached tensors.

    alpha / beta: normalised α, β (Eq. 5); alpha_raw / beta_raw: clamped meta-gradients α̃, β̃ (Eq. 4);
    alpha_signed / beta_signed: −∂L_meta/∂ε before the clamp (what `ReliabilityMemory` accumulates).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    alpha_raw: torch.Tensor
    beta_raw: torch.Tensor
    alpha_signed: torch.Tensor
    beta_signed: torch.Tensor


def normalize_reliabilities(
    alpha_raw: torch.Tensor, beta_raw: torch.Tensor, normalization: str = "separate", delta: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-normalise the raw reliabilities α̃, β̃ (non-negative, shape (n,)).

    ``"separate"`` (Eq. 5, HRP): α = n α̃ / (Σ α̃ + δ) and β = n β̃ / (Σ β̃ + δ), so each has batch
    mean 1 whenever any of its raw values is positive, and is 0 when none is. n and Σ are global
    (over every rank's samples) in a data-parallel run.

    ``"coupled"`` (the L2B-like "Coupled Meta" ablation): one joint normaliser,
    α = 2n α̃ / (Σ α̃ + Σ β̃ + δ), β = 2n β̃ / (Σ α̃ + Σ β̃ + δ), so Σ(α + β) = 2n: mass given to the
    noisy label is taken from the pseudo-label and vice versa (the zero-sum coupling). The factor 2 gives
    the same total mass as "separate" (mean α + mean β = 2), so T = α + β, RAM's gate and the CE weights
    keep their scale and the ablation changes only the coupling (with n, mean T would halve and GRG would
    halve RAM's weight: a confound).
    """
    n = global_count(alpha_raw.shape[0])
    alpha_sum, beta_sum = global_sum(alpha_raw.sum()), global_sum(beta_raw.sum())
    if normalization == "separate":
        return n * alpha_raw / (alpha_sum + delta), n * beta_raw / (beta_sum + delta)
    if normalization == "coupled":
        joint = alpha_sum + beta_sum + delta
        return 2 * n * alpha_raw / joint, 2 * n * beta_raw / joint
    raise UserError(f"unknown reliability normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")


def meta_reliabilities(
    model: nn.Module,
    x: torch.Tensor,
    noisy_labels: torch.Tensor,
    pseudo_labels: torch.Tensor,
    meta_x: torch.Tensor,
    meta_y: torch.Tensor,
    lr: float,
    *,
    normalization: str = "separate",
    method: str = "jvp",
    delta: float = 1e-8,
    calibrated: bool = False,
    meta_bn: str = "eval",
) -> Reliabilities:
    """α, β of every sample in the batch (Eqs. 1–5) for ``model`` at its current parameters.

    ``lr`` is the network's current learning rate η of the virtual step (Eq. 2). The virtual step
    is plain SGD over the parameters that require grad (no momentum, no weight decay).
    """
    if method not in METHODS:
        raise UserError(f"unknown meta-gradient method {method!r}; use one of {', '.join(METHODS)}")
    if normalization not in NORMALIZATIONS:
        raise UserError(f"unknown reliability normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    if meta_bn not in META_BN_MODES:
        raise UserError(f"unknown meta_bn {meta_bn!r}; use one of {', '.join(META_BN_MODES)}")
    raw = _raw_reliabilities_jvp if method == "jvp" else _raw_reliabilities_double_backward
    with _preserved_modes(model), torch.enable_grad():
        alpha_signed, beta_signed = raw(
            model, x, noisy_labels, pseudo_labels, meta_x, meta_y, lr, calibrated, meta_bn == "batch"
        )
    return reliabilities_from_signed(alpha_signed.detach(), beta_signed.detach(), normalization, delta)


def reliabilities_from_signed(
    alpha_signed: torch.Tensor, beta_signed: torch.Tensor, normalization: str = "separate", delta: float = 1e-8
) -> Reliabilities:
    """Eqs. 4–5 from the signed meta-gradients −∂L_meta/∂ε: clamp at 0, then batch-normalise."""
    alpha_raw, beta_raw = alpha_signed.clamp_min(0), beta_signed.clamp_min(0)
    alpha, beta = normalize_reliabilities(alpha_raw, beta_raw, normalization, delta)
    return Reliabilities(
        alpha=alpha,
        beta=beta,
        alpha_raw=alpha_raw,
        beta_raw=beta_raw,
        alpha_signed=alpha_signed,
        beta_signed=beta_signed,
    )


class ReliabilityMemory:
    """Per-sample exponential moving average of the meta-gradients across visits (``reliability_momentum``).

    Not in SPEC's equations (a measured config choice, SPEC §3.1's last note): one meta batch per iteration
    gives a noisy per-sample signal, and a sample is visited once per epoch at other parameters, so the
    visits are close to independent estimates of the same influence (TracIn's sum over checkpoints).
    What is averaged is scale-free — each batch's signed −∂L_meta/∂ε divided by the batch's mean absolute
    value — because the raw scale follows the learning rate and the gradient norms, which change over
    training. Eq. 4's clamp and Eq. 5's batch normalisation then act on the averages. A sample whose
    pseudo-label changed since its last visit restarts its β average (β is the reliability of *that* label).
    momentum 0 keeps no memory: exactly Eqs. 4–5 of one batch.
    """

    def __init__(self, num_samples: int, momentum: float, device: torch.device | str = "cpu"):
        self.momentum = momentum
        self.alpha = torch.full((num_samples,), float("nan"), device=device)
        self.beta = torch.full((num_samples,), float("nan"), device=device)
        self.pseudo = torch.full((num_samples,), -1, dtype=torch.long, device=device)

    def update(
        self, index: torch.Tensor, rel: Reliabilities, pseudo_labels: torch.Tensor, normalization: str, delta: float
    ) -> Reliabilities:
        """The batch's reliabilities from the averages after this visit. Data-parallel: every rank stores every
        rank's rows (a sample meets other ranks in other epochs), and returns its own."""
        if self.momentum == 0:
            return rel
        index_all, pseudo_all = all_gather(index), all_gather(pseudo_labels)
        alpha = self._average(self.alpha, index_all, all_gather(_scale_free(rel.alpha_signed, delta)), fresh=None)
        beta = self._average(
            self.beta,
            index_all,
            all_gather(_scale_free(rel.beta_signed, delta)),
            fresh=self.pseudo[index_all] != pseudo_all,
        )
        self.pseudo[index_all] = pseudo_all
        own = slice(rank() * len(index), (rank() + 1) * len(index))
        return reliabilities_from_signed(alpha[own], beta[own], normalization, delta)

    def _average(
        self, store: torch.Tensor, index: torch.Tensor, value: torch.Tensor, fresh: torch.Tensor | None
    ) -> torch.Tensor:
        previous = store[index]
        restart = torch.isnan(previous) if fresh is None else torch.isnan(previous) | fresh
        updated = torch.where(restart, value, self.momentum * previous + (1 - self.momentum) * value.to(previous.dtype))
        store[index] = updated.to(store.dtype)
        return updated

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"alpha": self.alpha.cpu(), "beta": self.beta.cpu(), "pseudo": self.pseudo.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("alpha", "beta", "pseudo"):
            getattr(self, name).copy_(state[name])


def _scale_free(signed: torch.Tensor, delta: float) -> torch.Tensor:
    """signed / mean |signed| over the (global) batch: sign and relative size kept, lr and gradient scale removed."""
    return signed / (global_sum(signed.abs().sum()) / global_count(signed.shape[0]) + delta)


def _raw_reliabilities_jvp(
    model: nn.Module,
    x: torch.Tensor,
    noisy_labels: torch.Tensor,
    pseudo_labels: torch.Tensor,
    meta_x: torch.Tensor,
    meta_y: torch.Tensor,
    lr: float,
    calibrated: bool = False,
    meta_batch_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """−∂L_meta/∂ε^α, −∂L_meta/∂ε^β (before clamping) via the gradient-alignment identity.

    v = ∇_θ L_meta(θ); one JVP gives dz_i = (∂z_i/∂θ) v for the train-mode logits z_i, and
    ⟨v, ∇_θ ℓ(z_i, y)⟩ = (softmax(z_i) − onehot(y)) · dz_i for y = ỹ_i and y = ŷ_i alike.
    """
    direction = meta_gradient(model, meta_x, meta_y, calibrated, meta_batch_stats)
    logits, dlogits = logit_changes(model, x, direction)
    scale = lr / global_count(x.shape[0])
    return scale * signed_alignment(logits, dlogits, noisy_labels), scale * signed_alignment(
        logits, dlogits, pseudo_labels
    )


def logit_changes(
    model: nn.Module, x: torch.Tensor, direction: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-mode logits z of ``x`` and their directional derivative dz = (∂z/∂θ) v along ``direction`` (one
    forward-mode pass; BN runs on cloned buffers, so the model's running statistics never change)."""
    params = _trainable_parameters(model)
    model.train()
    # torch.func.jvp refuses BN's in-place running-stat update of a captured buffer, so use the
    # forward-AD API directly; the buffers are clones, and no_grad keeps no reverse graph.
    with torch.no_grad(), fwAD.dual_level():
        duals = {name: fwAD.make_dual(p.detach(), direction[name]) for name, p in params.items()}
        out = functional_call(model, (duals, _cloned_buffers(model)), (x,))
        logits, dlogits = fwAD.unpack_dual(out)
    return _at_least_float32(logits), _at_least_float32(dlogits)


def signed_alignment(logits: torch.Tensor, dlogits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """⟨v, ∇_θ ℓ(z_i, y_i)⟩ = (softmax(z_i) − onehot(y_i)) · dz_i for each row (the gradient-alignment identity)."""
    expected = (logits.softmax(dim=1) * dlogits).sum(dim=1)
    return expected - dlogits.gather(1, labels[:, None]).squeeze(1)


def _raw_reliabilities_double_backward(
    model: nn.Module,
    x: torch.Tensor,
    noisy_labels: torch.Tensor,
    pseudo_labels: torch.Tensor,
    meta_x: torch.Tensor,
    meta_y: torch.Tensor,
    lr: float,
    calibrated: bool = False,
    meta_batch_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """−∂L_meta/∂ε^α, −∂L_meta/∂ε^β (before clamping) by differentiating through the virtual step."""
    params = _trainable_parameters(model)
    n = x.shape[0]
    model.train()
    logits = _at_least_float32(functional_call(model, (params, _cloned_buffers(model)), (x,)))
    eps_alpha = torch.zeros(n, dtype=logits.dtype, device=logits.device, requires_grad=True)
    eps_beta = torch.zeros(n, dtype=logits.dtype, device=logits.device, requires_grad=True)
    inner = weighted_label_ce(logits, noisy_labels, pseudo_labels, eps_alpha, eps_beta)
    grads = _grads_or_zeros(inner, params, create_graph=True)
    # ∇L_ε over the global batch: the mean of the ranks' gradients of their local means (equal n per rank)
    stepped = {name: p - lr * global_sum(grads[name]) / world_size() for name, p in params.items()}

    meta_logits = _meta_logits(model, stepped, meta_x, meta_batch_stats)
    if calibrated:  # at ε = 0, θ̂ = θ: these logits are the ones to fit (s, b) on, held fixed for the derivative
        meta_logits = _calibrator(meta_logits.detach(), meta_y)(meta_logits)
    meta_loss = F.cross_entropy(meta_logits, meta_y)
    # L_meta is the mean over ranks; the all-reduce in θ̂ carries every rank's ∂L_meta/∂θ̂ back to ε
    d_alpha, d_beta = torch.autograd.grad(meta_loss / world_size(), (eps_alpha, eps_beta))
    return -d_alpha, -d_beta


def meta_gradient(
    model: nn.Module,
    meta_x: torch.Tensor,
    meta_y: torch.Tensor,
    calibrated: bool = False,
    meta_batch_stats: bool = False,
) -> dict[str, torch.Tensor]:
    """v = ∇_θ L_meta(θ) (Eq. 3 at ε = 0) without touching ``.grad``; averaged over ranks. BN in eval mode, or
    (``meta_batch_stats``) on the meta batch's own statistics with cloned buffers. ``calibrated``: the meta loss
    at the meta batch's fitted temperature and class biases (module docstring)."""
    params = _trainable_parameters(model)
    logits = _meta_logits(model, params, meta_x, meta_batch_stats)
    if calibrated:
        logits = _calibrator(logits.detach(), meta_y)(logits)
    meta_loss = F.cross_entropy(logits, meta_y)
    grads = _grads_or_zeros(meta_loss, params, create_graph=False)
    return global_mean_of_grads({name: g.detach() for name, g in grads.items()})


def _meta_logits(
    model: nn.Module, params: dict[str, torch.Tensor], meta_x: torch.Tensor, batch_stats: bool
) -> torch.Tensor:
    """The meta batch's logits at ``params``: BN on the running statistics (eval mode), or on the batch's own
    statistics (train mode) with the running buffers cloned, so they never change."""
    if batch_stats:
        model.train()
        return _at_least_float32(functional_call(model, (params, _cloned_buffers(model)), (meta_x,)))
    model.eval()
    return _at_least_float32(functional_call(model, params, (meta_x,)))


def fit_calibration(
    logits: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-4, iterations: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, b) minimising (1/m) Σ_j CE(s z_j + b, y_j) + (ridge/2)((s − 1)² + ‖b‖²): temperature scaling (T = 1/s)
    with class biases. Convex in (s, b); the ridge keeps the optimum finite when the batch is separable.

    Damped Newton with a fixed number of steps (no host synchronisation). With u = s z + b and p = softmax(u)
    per row, the CE's Hessian in (s, b) is the mean over rows of [[Var_p z, Cov_p(z, e_c)], [·, diag p − p pᵀ]].
    """
    z = logits.detach()
    m, num_classes = z.shape
    one_hot = F.one_hot(labels, num_classes).to(z.dtype)
    ridge_eye = ridge * torch.eye(num_classes + 1, dtype=z.dtype, device=z.device)
    theta = torch.zeros(num_classes + 1, dtype=z.dtype, device=z.device)
    theta[0] = 1
    prior = theta.clone()
    for _ in range(iterations):
        p = torch.softmax(theta[0] * z + theta[1:], dim=1)
        expected_z = (p * z).sum(dim=1, keepdim=True)  # E_p[z] per row
        grad = torch.cat([((p - one_hot) * z).sum(dim=1).mean(dim=0, keepdim=True), (p - one_hot).mean(dim=0)])
        scale_scale = (p * (z - expected_z) ** 2).sum(dim=1).mean(dim=0, keepdim=True)  # Var_p[z]
        scale_bias = (p * (z - expected_z)).mean(dim=0)  # Cov_p[z, e_c]
        bias_bias = torch.diag(p.mean(dim=0)) - p.T @ p / m
        curvature = (
            torch.cat(
                [torch.cat([scale_scale, scale_bias])[None, :], torch.cat([scale_bias[:, None], bias_bias], dim=1)]
            )
            + ridge_eye
        )
        step = torch.linalg.solve(curvature, grad + ridge * (theta - prior))
        # a step no longer than max(‖θ‖, 1): no overshoot far from the optimum, yet a scale can grow geometrically
        theta = theta - step * (theta.norm().clamp_min(1.0) / step.norm()).clamp_max(1.0)
    return theta[0], theta[1:]


def _calibrator(logits: torch.Tensor, labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """z ↦ s z + b fitted on the whole meta batch (every rank's slice, so data-parallel fits what one process does)."""
    scale, bias = fit_calibration(all_gather(logits), all_gather(labels))
    return lambda z: scale * z + bias


def _grads_or_zeros(loss: torch.Tensor, params: dict[str, torch.Tensor], create_graph: bool) -> dict[str, torch.Tensor]:
    """autograd.grad of ``loss`` w.r.t. every parameter; a parameter the loss ignores gets zeros."""
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), grads)}


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are promoted for the loss; float64 stays float64 (the exactness tests use it)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters an SGD step would move (requires_grad), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _cloned_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every buffer, so train-mode BN updates land on the copies, not on the model."""
    return {name: b.clone() for name, b in model.named_buffers()}


@contextlib.contextmanager
def _preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore each submodule's own train/eval flag on exit (a model may keep some parts in eval)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
