"""L2B (hrp_ood/trainers/l2b.py) against independent computations: the virtual step against torch.optim.SGD itself,
the meta-gradients against autograd through a parameter update written out by hand (and finite differences), the
single normaliser over both rows, the summed loss, the untouched BN running statistics and the gradient clip."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_args
from hrp_ood.train.trainer import build_members
from torch import nn
from torch.func import functional_call

import hrp_ood.trainers.l2b as l2b
from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.config import build_config
from hrp_ood.data.augment import BatchAugment
from hrp_ood.trainers.base import StepContext, StepInputs
from hrp_ood.trainers.signals import EpochSignals

CLASSES = 3


class TinyBNNet(nn.Module):
    """Conv + BatchNorm2d, then Linear + BatchNorm1d: the batch statistics couple the samples."""

    def __init__(self):
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
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.fc(self.features(x))


def tiny_problem(seed=0, n=8, m=6, steps=3, lr=0.5, momentum=0.9, weight_decay=5e-4, **sgd):
    """A float64 TinyBNNet with non-trivial running statistics, its SGD after `steps` real steps (momentum buffers
    built up), a batch and a meta batch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyBNNet().double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, **sgd)
    for _ in range(steps):
        xs = torch.randn(n, 3, 6, 6, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        F.cross_entropy(model(xs), torch.randint(CLASSES, (n,), generator=gen)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    x = torch.randn(n, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1  # batch stats far from the running ones
    labels = torch.randint(CLASSES, (n,), generator=gen)
    meta_x = torch.randn(m, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 - 1
    meta_y = torch.randint(CLASSES, (m,), generator=gen)
    return model, opt, x, labels, meta_x, meta_y


def buffers_of(model):
    return {name: b.clone() for name, b in model.named_buffers()}


# ---- the virtual step ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "steps, sgd",
    [(0, {}), (3, {}), (3, {"nesterov": True}), (3, {"dampening": 0.3})],
    ids=["first-step", "momentum-buffers", "nesterov", "dampening"],
)
def test_virtual_step_equals_a_real_sgd_step_on_the_eps_weighted_costs(steps, sgd):
    model, opt, x, labels, _, _ = tiny_problem(steps=steps, **sgd)
    eps = torch.rand(2, len(labels), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = dict(model.named_parameters())

    def weighted_costs():
        logits = model(x)
        pseudo = logits.argmax(dim=1)
        costs = torch.stack(
            [F.cross_entropy(logits, labels, reduction="none"), F.cross_entropy(logits, pseudo, reduction="none")]
        )
        return (eps * costs).sum()

    grads = dict(zip(params, torch.autograd.grad(weighted_costs(), list(params.values()))))
    virtual = l2b.virtual_sgd_step(opt, params, grads)
    before = {name: p.detach().clone() for name, p in params.items()}

    opt.zero_grad()
    weighted_costs().backward()
    opt.step()
    for name, p in params.items():
        torch.testing.assert_close(virtual[name], p.detach(), rtol=1e-12, atol=1e-12, msg=name)
        assert not torch.equal(virtual[name], before[name]), name


def test_virtual_step_changes_neither_parameters_nor_optimizer_state():
    model, opt, *_ = tiny_problem()
    params = dict(model.named_parameters())
    state = copy.deepcopy(opt.state_dict())
    before = {name: p.detach().clone() for name, p in params.items()}
    l2b.virtual_sgd_step(opt, params, {name: torch.ones_like(p) for name, p in params.items()})
    for name, p in params.items():
        assert torch.equal(p, before[name])
    after = opt.state_dict()
    for key, s in state["state"].items():
        assert torch.equal(after["state"][key]["momentum_buffer"], s["momentum_buffer"])


# ---- the meta-gradients -------------------------------------------------------------------------------------------
def hand_written_meta_gradients(model, opt, x, labels, meta_x, meta_y):
    """−∂L_meta/∂ε (2, n) by autograd through SGD's update written out here (momentum 0.9 with the optimizer's
    buffers, weight decay, lr; dampening 0, no nesterov), both forwards in train mode on copies of the buffers."""
    group = opt.param_groups[0]
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    params = dict(model.named_parameters())
    model.train()
    logits = functional_call(model, (params, buffers_of(model)), (x,))
    pseudo = logits.argmax(dim=1)
    costs = torch.stack(
        [F.cross_entropy(logits, labels, reduction="none"), F.cross_entropy(logits, pseudo, reduction="none")]
    )

    def meta_loss(eps):
        grads = torch.autograd.grad((eps * costs).sum(), list(params.values()), create_graph=True)
        stepped = {}
        for (name, p), g in zip(params.items(), grads):
            buf = mu * opt.state[p]["momentum_buffer"] + g + wd * p.detach()
            stepped[name] = p.detach() - lr * buf
        return F.cross_entropy(functional_call(model, (stepped, buffers_of(model)), (meta_x,)), meta_y)

    eps = torch.zeros(2, len(labels), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(meta_loss(eps), eps)
    return pseudo, -grad, meta_loss


def test_meta_gradients_match_autograd_through_a_hand_written_sgd_update_and_finite_differences():
    model, opt, x, labels, meta_x, meta_y = tiny_problem()
    pseudo, signed = l2b.l2b_meta_gradients(model, opt, x, labels, meta_x, meta_y)
    expected_pseudo, expected, meta_loss = hand_written_meta_gradients(model, opt, x, labels, meta_x, meta_y)
    assert torch.equal(pseudo, expected_pseudo)
    assert signed.shape == (2, len(labels))
    torch.testing.assert_close(signed, expected, rtol=1e-8, atol=1e-12)
    # the hand-written reference itself, by central differences on a few entries
    h = 1e-5
    for row, col in [(0, 0), (0, 3), (1, 5)]:
        bump = torch.zeros(2, len(labels), dtype=torch.float64)
        bump[row, col] = h
        difference = (meta_loss(bump).detach() - meta_loss(-bump).detach()) / (2 * h)
        torch.testing.assert_close(-difference, expected[row, col], rtol=1e-5, atol=1e-9)
    assert (signed > 0).any() and (signed < 0).any()  # a test in which the clamp matters


def test_meta_gradients_depend_on_the_momentum_buffers():
    """The momentum buffers move the point where the meta gradient is taken: zeroing them changes the numbers (so
    the test problem above, built after three real steps, can see a virtual step without momentum)."""
    model, opt, x, labels, meta_x, meta_y = tiny_problem()
    _, signed = l2b.l2b_meta_gradients(model, opt, x, labels, meta_x, meta_y)
    no_momentum = copy.deepcopy(opt.state_dict())
    for s in no_momentum["state"].values():
        s["momentum_buffer"].zero_()
    opt_zero = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt_zero.load_state_dict(no_momentum)
    _, without = l2b.l2b_meta_gradients(model, opt_zero, x, labels, meta_x, meta_y)
    assert (signed - without).abs().max() > 1e-3 * signed.abs().max()


def test_meta_gradients_leave_running_statistics_grads_state_and_modes_untouched():
    model, opt, x, labels, meta_x, meta_y = tiny_problem()
    model.features[1].eval()  # a submodule in eval mode: its flag comes back
    buffers, state = buffers_of(model), copy.deepcopy(opt.state_dict())
    l2b.l2b_meta_gradients(model, opt, x, labels, meta_x, meta_y)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert all(p.grad is None for p in model.parameters())
    for key, s in state["state"].items():
        assert torch.equal(opt.state_dict()["state"][key]["momentum_buffer"], s["momentum_buffer"])
    assert model.training and not model.features[1].training


# ---- the step -----------------------------------------------------------------------------------------------------
N, META = 8, 8


def make_step(**overrides):
    cfg = build_config(
        overrides={
            "model": "small_cnn",
            "method": "l2b",
            "batch_size": N,
            "meta_batch_size": META,
            "warmup_epochs": 0,
            "strong_policy": "none",
            "device": "cpu",
            "lr": 0.1,
            **overrides,
        }
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    clean = torch.where(torch.arange(N) % 2 == 0, labels, (labels + 1) % CLASSES)
    meta_images = torch.randint(0, 256, (META, 3, 32, 32), dtype=torch.uint8, generator=g)
    meta_labels = torch.randint(0, CLASSES, (META,), generator=g)
    torch.manual_seed(1)
    members = build_members(cfg, CLASSES, torch.device("cpu"))
    # no crop, no flip: the weak view is deterministic, so a copy of the network can see the same batch
    augment = BatchAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, padding=0, strong_policy="none", flip=False)
    ctx = StepContext(cfg, augment, meta_images, meta_labels, autocast_device=None)
    ctx.signals = EpochSignals(N, CLASSES)
    batch = StepInputs(images, labels, torch.arange(N), epoch=1.0, clean_labels=clean)
    return ctx, members, batch


def given_meta_gradients(monkeypatch, pseudo, signed):
    monkeypatch.setattr(l2b, "l2b_meta_gradients", lambda *args: (pseudo, signed))


def test_loss_is_the_sum_of_costs_weighted_by_one_normaliser_over_both_rows(monkeypatch):
    ctx, members, batch = make_step()
    pseudo = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    signed = torch.tensor([[3.0, -1.0, 0.0, 1.0, 2.0, -4.0, 0.5, 0.0], [1.0, 1.0, -2.0, 0.0, 0.0, 6.0, 0.0, 0.5]])
    given_meta_gradients(monkeypatch, pseudo, signed)
    net = copy.deepcopy(members[0].net)
    logs = l2b.step(ctx, members, batch)

    clamped = np.maximum(signed.numpy().astype(np.float64), 0)
    weights = clamped / clamped.sum()  # total 15: one normaliser over the 2B entries
    with torch.no_grad():
        logits = net(ctx.augment.weak(batch.images)).double()
    costs = np.stack(
        [
            F.cross_entropy(logits, batch.noisy_labels, reduction="none").numpy(),
            F.cross_entropy(logits, pseudo, reduction="none").numpy(),
        ]
    )
    assert logs["loss"].item() == pytest.approx((weights * costs).sum(), rel=1e-5)
    np.testing.assert_allclose(ctx.signals.values["alpha"].numpy(), weights[0], rtol=1e-6)
    np.testing.assert_allclose(ctx.signals.values["beta"].numpy(), weights[1], rtol=1e-6)
    np.testing.assert_allclose(ctx.signals.values["loss"].numpy(), costs[0], rtol=1e-5)
    assert logs["weight_given"].item() == pytest.approx(weights[0].sum(), rel=1e-6)
    assert logs["weight_nonzero"].item() == pytest.approx((clamped > 0).mean())


def test_the_loss_trains_the_network_on_exactly_that_sum(monkeypatch):
    """The real step's gradient is the one of Σ w ⊙ C (here with no clip, no momentum yet, no weight decay)."""
    ctx, members, batch = make_step(grad_clip=0.0, weight_decay=0.0)
    pseudo = torch.tensor([1, 1, 2, 0, 1, 2, 0, 0])
    signed = torch.linspace(-1.0, 2.0, 2 * N).view(2, N)
    given_meta_gradients(monkeypatch, pseudo, signed)
    net = copy.deepcopy(members[0].net)
    l2b.step(ctx, members, batch)

    w = signed.clamp_min(0) / signed.clamp_min(0).sum()
    logits = net(ctx.augment.weak(batch.images))
    costs = torch.stack(
        [
            F.cross_entropy(logits, batch.noisy_labels, reduction="none"),
            F.cross_entropy(logits, pseudo, reduction="none"),
        ]
    )
    grads = torch.autograd.grad((w * costs).sum(), list(net.parameters()))
    for (name, p), p0, g in zip(members[0].net.named_parameters(), net.parameters(), grads):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * g, rtol=1e-4, atol=1e-6, msg=name)


def test_all_zero_weights_give_a_zero_loss_and_no_nan(monkeypatch):
    ctx, members, batch = make_step()
    given_meta_gradients(monkeypatch, torch.zeros(N, dtype=torch.long), -torch.rand(2, N))
    logs = l2b.step(ctx, members, batch)
    assert logs["loss"].item() == 0.0
    assert logs["weight_nonzero"].item() == 0.0
    assert all(torch.isfinite(p).all() for p in members[0].net.parameters())
    assert (ctx.signals.values["alpha"] == 0).all() and (ctx.signals.values["beta"] == 0).all()
    assert ctx.skipped_steps == 0


def test_running_statistics_change_only_by_the_training_forward():
    """A whole step (real meta step) moves the BN running statistics exactly as one train-mode forward of the
    batch does: the virtual and meta forwards leave them alone."""
    ctx, members, batch = make_step()
    net = copy.deepcopy(members[0].net).train()
    with torch.no_grad():
        net(ctx.augment.weak(batch.images))
    l2b.step(ctx, members, batch)
    expected = dict(net.named_buffers())
    for name, b in members[0].net.named_buffers():
        torch.testing.assert_close(b, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("warm_up", [False, True])
def test_the_gradient_norm_is_clipped_before_the_step(warm_up):
    """From the same state, the step applies the unclipped gradient scaled to the clip's norm (at the first step,
    without weight decay, SGD's momentum buffer is the gradient it applied), in the warm-up too (as the reference)."""
    clip = 1e-3
    applied = {}
    for value in (0.0, clip):
        ctx, members, batch = make_step(grad_clip=value, weight_decay=0.0, warmup_epochs=2 if warm_up else 0)
        torch.manual_seed(3)  # the same meta batch in both runs
        logs = l2b.step(ctx, members, batch)
        opt = members[0].optimizer
        applied[value] = torch.cat([opt.state[p]["momentum_buffer"].flatten() for p in members[0].net.parameters()])
        assert ("grad_norm" in logs) == (value > 0)
    raw_norm = applied[0.0].norm()
    assert raw_norm > 10 * clip
    assert logs["grad_norm"].item() == pytest.approx(raw_norm.item(), rel=1e-5)
    torch.testing.assert_close(applied[clip], applied[0.0] * clip / raw_norm, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("dataset, clip", [("cifar10", 0.25), ("cifar100", 0.80), ("svhn", 0.25)])
def test_grad_clip_defaults_to_the_reference_value_of_the_dataset(dataset, clip):
    assert build_config(overrides={"method": "l2b", "dataset": dataset, "noise": "sym20"}).grad_clip == clip
    assert build_config(overrides={"method": "l2b", "dataset": dataset, "grad_clip": 0.5}).grad_clip == 0.5


@pytest.mark.parametrize("name, batch, clip", [("cifar10", 512, 0.25), ("cifar100", 256, 0.80)])
def test_configs_carry_the_reference_schedule(name, batch, clip):
    cfg = build_config(f"configs/{name}_l2b.yaml")
    assert (cfg.method, cfg.epochs, cfg.lr, cfg.lr_schedule, cfg.warmup_epochs) == ("l2b", 300, 0.15, "cosine", 10)
    assert (cfg.batch_size, cfg.meta_batch_size, cfg.grad_clip, cfg.weight_decay) == (batch, batch, clip, 5e-4)


# ---- end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_l2b_writes_alpha_auroc_one_network_and_resumes(make_cifar_root, tmp_path):
    root = make_cifar_root(200, 60)
    args = ["train", "--data-root", str(root), "--noise", "sym50", "--out-dir", str(tmp_path), "--name", "l2b"]
    args += [*tiny_train_args(method="l2b"), "--set", "warmup_epochs=1", "--set", "lr_schedule=cosine"]
    assert main([*args, "--epochs", "2"]) == 0
    run = tmp_path / "l2b"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["alpha_auroc"] == "" and rows[1]["alpha_auroc"] != ""  # warm-up, then L2B's weights
    for column in ("loss", "weight_given", "weight_nonzero", "grad_norm", "loss_auroc", "beta_pseudo_auroc"):
        assert rows[1][column] != "", column
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and len(state["nets"]) == 1 and state["config"]["grad_clip"] == 0.25
    assert state["optimizers"][0]["state"], "momentum buffers are saved"
    assert (
        main(["train", "--out-dir", str(tmp_path), "--name", "l2b", "--resume", "--epochs", "3", "--no-progress"]) == 0
    )
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
