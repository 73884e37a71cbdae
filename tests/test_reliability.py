"""Meta reliabilities (SPEC §3.1): exactness against a brute-force autograd reference, side effects, normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hrp_ood.errors import UserError
from hrp_ood.method import meta_reliabilities, normalize_reliabilities, weighted_label_ce
from hrp_ood.method.reliability import fit_calibration, meta_gradient

NUM_CLASSES = 3


class TinyBNNet(nn.Module):
    """Conv + BatchNorm2d, then Linear + BatchNorm1d: both BN kinds couple the samples of a batch."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8, num_classes)
        self.unused = nn.Linear(2, 2)  # never called: its meta-gradient must be treated as zero
        self.frozen = nn.Parameter(torch.ones(8), requires_grad=False)  # not moved by the virtual step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x) * self.frozen)


def _tiny_problem(seed: int = 0, n: int = 8, m: int = 6):
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # nn.Module init draws from the global RNG; restored below
    model = TinyBNNet().double()
    torch.random.set_rng_state(torch_state)
    # Non-trivial running statistics, so eval mode differs from train mode.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
    x = torch.randn(n, 3, 6, 6, generator=gen, dtype=torch.float64)
    noisy = torch.randint(NUM_CLASSES, (n,), generator=gen)
    pseudo = torch.randint(NUM_CLASSES, (n,), generator=gen)
    meta_x = torch.randn(m, 3, 6, 6, generator=gen, dtype=torch.float64)
    meta_y = torch.randint(NUM_CLASSES, (m,), generator=gen)
    return model, x, noisy, pseudo, meta_x, meta_y


def brute_force_raw(model, x, noisy, pseudo, meta_x, meta_y, lr, meta_bn="eval"):
    """Eqs. 1–4 literally: ε leaves at zero, one virtual SGD step, meta loss in eval mode (meta_bn "batch": in train
    mode on copies of the buffers), grad w.r.t. ε."""
    was_training = model.training
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    n = x.shape[0]
    eps_a = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    eps_b = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    model.train()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    logits = functional_call(model, {**params, **buffers}, (x,))
    inner = (eps_a * F.cross_entropy(logits, noisy, reduction="none")).sum() / n + (
        eps_b * F.cross_entropy(logits, pseudo, reduction="none")
    ).sum() / n
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)
    stepped = {k: p if g is None else p - lr * g for (k, p), g in zip(params.items(), grads)}
    if meta_bn == "batch":
        meta_logits = functional_call(model, {**stepped, **{k: b.clone() for k, b in model.named_buffers()}}, (meta_x,))
    else:
        model.eval()
        meta_logits = functional_call(model, stepped, (meta_x,))
    d_a, d_b = torch.autograd.grad(F.cross_entropy(meta_logits, meta_y), (eps_a, eps_b))
    model.train(was_training)
    return (-d_a).clamp_min(0), (-d_b).clamp_min(0)


def per_sample_gradient_raw(model, x, noisy, pseudo, meta_x, meta_y, lr):
    """Second reference via the identity −∂L_meta/∂ε_i = (η/n)⟨∇L_meta, ∇ℓ_i⟩, one backward per sample."""
    params = [p for p in model.named_parameters() if p[1].requires_grad]
    tensors = [p for _, p in params]
    model.eval()
    meta_grad = torch.autograd.grad(F.cross_entropy(model(meta_x), meta_y), tensors, allow_unused=True)
    model.train()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    logits = functional_call(model, {**dict(params), **buffers}, (x,))
    n = x.shape[0]
    out = []
    for labels in (noisy, pseudo):
        losses = F.cross_entropy(logits, labels, reduction="none")
        values = []
        for i in range(n):
            g_i = torch.autograd.grad(losses[i], tensors, retain_graph=True, allow_unused=True)
            values.append(sum((a * b).sum() for a, b in zip(meta_grad, g_i) if a is not None and b is not None))
        out.append((lr / n * torch.stack(values)).clamp_min(0))
    return out


@pytest.mark.parametrize("method", ["jvp", "double_backward"])
@pytest.mark.parametrize("meta_bn", ["eval", "batch"])
def test_matches_brute_force_reference(method, meta_bn):
    model, x, noisy, pseudo, meta_x, meta_y = _tiny_problem()
    lr = 0.1
    ref_a, ref_b = brute_force_raw(model, x, noisy, pseudo, meta_x, meta_y, lr, meta_bn)
    assert (ref_a > 0).any() and (ref_a == 0).any(), "reference should exercise both the clamp and positives"
    rel = meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, lr, method=method, meta_bn=meta_bn)
    for got, want in ((rel.alpha_raw, ref_a), (rel.beta_raw, ref_b)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    other_a, _ = brute_force_raw(model, x, noisy, pseudo, meta_x, meta_y, lr, "batch" if meta_bn == "eval" else "eval")
    assert not torch.allclose(other_a, ref_a), "the two BN modes must give different meta-gradients here"
    if meta_bn == "batch":
        return
    ps_a, ps_b = per_sample_gradient_raw(model, x, noisy, pseudo, meta_x, meta_y, lr)
    torch.testing.assert_close(ps_a, ref_a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ps_b, ref_b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["jvp", "double_backward"])
@pytest.mark.parametrize("meta_bn", ["eval", "batch"])
def test_no_side_effects_on_model(method, meta_bn):
    model, x, noisy, pseudo, meta_x, meta_y = _tiny_problem(seed=1)
    model.train()
    model.features[1].eval()  # a submodule kept in eval mode on purpose must stay so
    buffers_before = {k: b.clone() for k, b in model.named_buffers()}
    params_before = {k: p.detach().clone() for k, p in model.named_parameters()}
    meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, 0.1, method=method, meta_bn=meta_bn)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers_before[k]), f"buffer {k} changed"
    for k, p in model.named_parameters():
        assert torch.equal(p, params_before[k]) and p.grad is None, f"parameter {k} changed or got .grad"
    assert model.training and not model.features[1].training and model.fc.training
    model.eval()
    meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, 0.1, method=method, meta_bn=meta_bn)
    assert not any(module.training for module in model.modules())


def test_normalized_outputs_follow_eq5():
    model, x, noisy, pseudo, meta_x, meta_y = _tiny_problem(seed=2)
    rel = meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, 0.05)
    n = x.shape[0]
    torch.testing.assert_close(rel.alpha, n * rel.alpha_raw / (rel.alpha_raw.sum() + 1e-8))
    torch.testing.assert_close(rel.beta, n * rel.beta_raw / (rel.beta_raw.sum() + 1e-8))
    coupled = meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, 0.05, normalization="coupled")
    torch.testing.assert_close(coupled.alpha_raw, rel.alpha_raw)
    joint = rel.alpha_raw.sum() + rel.beta_raw.sum()
    torch.testing.assert_close((coupled.alpha + coupled.beta).sum(), 2 * n * joint / (joint + 1e-8))
    for t in (rel.alpha, rel.beta, rel.alpha_raw, rel.beta_raw):
        assert not t.requires_grad and (t >= 0).all()


def test_separate_normalization_properties():
    alpha_raw = torch.tensor([0.0, 2e-4, 6e-4, 2e-4])
    beta_raw = torch.tensor([1.0, 0.0, 0.0, 3.0])
    alpha, beta = normalize_reliabilities(alpha_raw, beta_raw, "separate")
    torch.testing.assert_close(alpha, torch.tensor([0.0, 0.8, 2.4, 0.8]), rtol=1e-4, atol=0)
    torch.testing.assert_close(beta, torch.tensor([1.0, 0.0, 0.0, 3.0]))
    assert abs(alpha.sum().item() - 4) < 1e-3 and abs(beta.sum().item() - 4) < 1e-6
    zeros_a, zeros_b = normalize_reliabilities(torch.zeros(5), torch.zeros(5), "separate")
    assert torch.equal(zeros_a, torch.zeros(5)) and torch.equal(zeros_b, torch.zeros(5))


def test_coupled_normalization_is_zero_sum():
    alpha_raw = torch.tensor([1.0, 0.0, 3.0])
    beta_raw = torch.tensor([0.0, 2.0, 0.0])
    alpha, beta = normalize_reliabilities(alpha_raw, beta_raw, "coupled")
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0, 3.0]))
    torch.testing.assert_close(beta, torch.tensor([0.0, 2.0, 0.0]))
    sep_alpha, sep_beta = normalize_reliabilities(alpha_raw, beta_raw, "separate")
    assert (alpha + beta).sum().item() == pytest.approx((sep_alpha + sep_beta).sum().item())  # same total mass
    # Raising one sample's β̃ lowers every α (the coupling); separate normalisation leaves α alone.
    more_beta = beta_raw + torch.tensor([0.0, 0.0, 4.0])
    alpha_more, _ = normalize_reliabilities(alpha_raw, more_beta, "coupled")
    assert (alpha_more[[0, 2]] < alpha[[0, 2]]).all()
    sep_before, _ = normalize_reliabilities(alpha_raw, beta_raw, "separate")
    sep_after, _ = normalize_reliabilities(alpha_raw, more_beta, "separate")
    assert torch.equal(sep_before, sep_after)
    assert not torch.isnan(torch.stack(normalize_reliabilities(torch.zeros(3), torch.zeros(3), "coupled"))).any()


def test_bad_options_are_user_errors():
    model, x, noisy, pseudo, meta_x, meta_y = _tiny_problem()
    with pytest.raises(UserError, match="method"):
        meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, 0.1, method="finite_difference")
    with pytest.raises(UserError, match="normalization"):
        meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, 0.1, normalization="joint")


def test_flipped_labels_get_lower_alpha_on_separable_toy():
    """After a few SGD steps on noisy labels, corrupted samples' gradients oppose the clean meta gradient."""
    gen = torch.Generator().manual_seed(0)
    n, n_meta, dim = 128, 64, 2
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])

    def blobs(count):
        y = torch.randint(2, (count,), generator=gen)
        return centres[y] + 0.5 * torch.randn(count, dim, generator=gen), y

    x, clean = blobs(n)
    meta_x, meta_y = blobs(n_meta)
    flipped = torch.rand(n, generator=gen) < 0.3
    noisy = torch.where(flipped, 1 - clean, clean)

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    torch.random.set_rng_state(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(x), noisy).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)

    for method in ("jvp", "double_backward"):
        rel = meta_reliabilities(model, x, noisy, noisy, meta_x, meta_y, 0.1, method=method)
        assert rel.alpha[flipped].mean() < 0.5 * rel.alpha[~flipped].mean()


def scipy_calibrated_meta_loss(logits: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-4) -> float:
    """min over (s, b) of mean CE(s z + b, y) + ridge/2 ((s − 1)² + ‖b‖²), by scipy's L-BFGS-B (float64)."""
    from scipy.optimize import minimize

    z, y = logits.detach().double(), labels

    def objective(theta):
        t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            value = F.cross_entropy(t[0] * z + t[1:], y) + ridge / 2 * ((t[0] - 1) ** 2 + (t[1:] ** 2).sum())
            value.backward()
        return value.item(), t.grad.numpy()

    start = [1.0] + [0.0] * z.shape[1]
    return minimize(
        objective, start, jac=True, method="L-BFGS-B", options={"maxiter": 10_000, "gtol": 1e-14, "ftol": 1e-16}
    ).fun


@pytest.mark.parametrize("scale", [0.2, 1.0, 8.0])
def test_fit_calibration_matches_scipy(scale):
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(10, (64,), generator=gen)
    informative = (torch.rand(64, 1, generator=gen) < 0.6) * F.one_hot(labels, 10)
    logits = scale * (torch.randn(64, 10, generator=gen, dtype=torch.float64) + 3 * informative)
    s, b = fit_calibration(logits, labels)
    ours = F.cross_entropy(s * logits + b, labels) + 1e-4 / 2 * ((s - 1) ** 2 + (b**2).sum())
    assert abs(ours.item() - scipy_calibrated_meta_loss(logits, labels)) < 1e-10


def test_fit_calibration_stays_finite_on_a_separable_batch():
    labels = torch.arange(20) % 4
    logits = 10 * F.one_hot(labels, 4).float()  # every label predicted with a margin: CE → 0 as s → ∞
    s, b = fit_calibration(logits, labels)
    assert torch.isfinite(s) and torch.isfinite(b).all() and s > 1


@pytest.mark.parametrize("method", ["jvp", "double_backward"])
def test_calibrated_reliabilities_are_finite_differences_of_the_calibrated_meta_loss(method):
    """−∂/∂ε_i of L*_meta(ε) = min_{s,b} CE(s f_θ̂(ε)(x^meta) + b) (+ ridge), each L* solved by scipy: the
    envelope theorem the implementation relies on (fit at θ, then hold (s, b) fixed), checked numerically."""
    model, x, noisy, pseudo, meta_x, meta_y = _tiny_problem(seed=2)
    lr, h = 0.5, 1e-4
    rel = meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, lr, method=method, calibrated=True)
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.clone() for k, b in model.named_buffers()}

    def calibrated_meta_loss(eps_alpha, eps_beta):
        train_params = {k: p.clone().requires_grad_() for k, p in params.items()}
        model.train()
        logits = functional_call(model, {**train_params, **{k: b.clone() for k, b in buffers.items()}}, (x,))
        inner = (
            eps_alpha * F.cross_entropy(logits, noisy, reduction="none")
            + eps_beta * F.cross_entropy(logits, pseudo, reduction="none")
        ).mean()
        grads = torch.autograd.grad(inner, list(train_params.values()), allow_unused=True)
        stepped = {k: p if g is None else p - lr * g for (k, p), g in zip(params.items(), grads)}
        model.eval()
        with torch.no_grad():
            return scipy_calibrated_meta_loss(functional_call(model, stepped, (meta_x,)), meta_y)

    n, zero = x.shape[0], torch.zeros(x.shape[0], dtype=torch.float64)
    for which, signed in ((0, rel.alpha_signed), (1, rel.beta_signed)):
        reference = []
        for i in range(n):
            bump = torch.zeros(n, dtype=torch.float64)
            bump[i] = h
            plus = calibrated_meta_loss(*((bump, zero) if which == 0 else (zero, bump)))
            minus = calibrated_meta_loss(*((-bump, zero) if which == 0 else (zero, -bump)))
            reference.append(-(plus - minus) / (2 * h))
        reference = torch.tensor(reference, dtype=torch.float64)
        assert (signed - reference).abs().max() <= 1e-4 * reference.abs().max()
    plain = meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, lr, method=method)
    assert not torch.allclose(plain.alpha_signed, rel.alpha_signed, rtol=0.05)  # calibration changes the signal


def test_calibrated_meta_gradient_has_no_logit_scale_or_class_shift_component():
    """At the meta batch's fitted (s, b) the meta gradient is (up to the small ridge) orthogonal to rescaling the
    head (all logits ×(1+t)) and has no head-bias component (class-marginal shift); the plain one has both."""
    from hrp_ood.models import create_model

    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=4)
    x = torch.randn(48, 3, 32, 32)
    with torch.no_grad():
        net.fc.weight.mul_(30)  # logits of a trained net's size (a fresh head's are ~0.1: T* would be in the 1000s)
        y = net.eval()(x).argmax(dim=1)  # labels the logits carry information about (finite T*) ...
    y[:12] = torch.arange(12) % 4  # ... but not all, and a class mix the plain gradient would shift
    head = {name: p.detach() for name, p in net.named_parameters() if name.startswith("fc.")}

    def head_components(direction):
        scale = sum((direction[name] * p).sum() for name, p in head.items())
        norm = (sum(direction[name].norm() ** 2 for name in head) * sum(p.norm() ** 2 for p in head.values())).sqrt()
        return (scale.abs() / norm).item(), (direction["fc.bias"].norm() / direction["fc.weight"].norm()).item()

    plain_scale, plain_bias = head_components(meta_gradient(net, x, y))
    cal_scale, cal_bias = head_components(meta_gradient(net, x, y, calibrated=True))
    assert cal_scale < 1e-2 < 0.05 < plain_scale
    assert cal_bias < 0.05 < 0.4 < plain_bias  # the ridge leaves a bias gradient of s·ridge·b*


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_on_the_meta_weighted_loss_lowers_the_meta_loss(seed):
    """ce_loss=meta_weighted: the gradient of Eq. 1 with a network's own α, β points down its meta loss. Its inner
    product with ∇L_meta (autograd, BN as in the meta step) is Σ_i (α_i s^α_i + β_i s^β_i) / η ≥ 0, s the signed
    meta-gradients, and one small SGD step on it lowers L_meta."""
    model, x, noisy, pseudo, meta_x, meta_y = _tiny_problem(seed)
    lr = 0.1
    rel = meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, lr)
    params = [p for p in model.parameters() if p.requires_grad]

    def meta_loss():
        model.eval()
        loss = F.cross_entropy(model(meta_x), meta_y)
        model.train()
        return loss

    meta_grads = torch.autograd.grad(meta_loss(), params, allow_unused=True)  # before a train-mode pass moves BN stats
    model.train()
    train_grads = torch.autograd.grad(
        weighted_label_ce(model(x), noisy, pseudo, rel.alpha, rel.beta), params, allow_unused=True
    )
    inner = sum((a * b).sum() for a, b in zip(train_grads, meta_grads) if a is not None and b is not None)
    expected = ((rel.alpha * rel.alpha_signed).sum() + (rel.beta * rel.beta_signed).sum()) / lr
    assert inner.item() == pytest.approx(expected.item(), rel=1e-6)
    assert inner.item() > 0
    before = meta_loss().item()
    with torch.no_grad():
        for p, g in zip(params, train_grads):
            if g is not None:
                p -= 1e-4 * g
    assert meta_loss().item() < before
