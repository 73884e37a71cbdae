"""DivideMix (hrp_ood/trainers/dividemix.py) against independent computations of the reference's equations
(LiJunnan1992/DivideMix @ d9d3058, Train_cifar.py): the GMM's lower-mean component, the co-divide crossing, the
90%-noise loss window, co-guessing / co-refinement with the right networks in the right modes, MixMatch's
max(l, 1 − l) and single permutation over labeled and unlabeled rows, Lu over rows and classes, the always-on prior
penalty, the λu ramp, the reference's hyper-parameters, the edge cases the reference crashes on, and an end-to-end
run with resume."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_args
from scipy import stats
from sklearn.mixture import GaussianMixture
from torch import nn

import hrp_ood.trainers.dividemix as dm
from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.config import build_config
from hrp_ood.data.augment import BatchAugment
from hrp_ood.registry import METHODS
from hrp_ood.trainers.base import Member, StepContext, StepInputs
from hrp_ood.trainers.signals import EpochSignals

CLASSES = 4


def config(**overrides):
    values = {"method": "dividemix", "model": "small_cnn", "device": "cpu", "batch_size": 4, "warmup_epochs": 1}
    return build_config(overrides={**values, **overrides})


def mlp_member(seed: int, features: int = 6) -> Member:
    """A tiny network with BatchNorm (train/eval mode matters) and its optimiser."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, CLASSES))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return Member(net, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0))


def context(cfg) -> StepContext:
    augment = BatchAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 8, strong_policy="none")
    return StepContext(cfg, augment, torch.zeros(0), torch.zeros(0), autocast_device=None)


# ---- GMM ------------------------------------------------------------------------------------------------------


def two_cluster_losses(seed=0, n_low=300, n_high=200):
    rng = np.random.default_rng(seed)
    return torch.tensor(np.concatenate([rng.normal(0.1, 0.05, n_low), rng.normal(0.8, 0.1, n_high)]))


def test_gmm_probability_is_the_posterior_of_the_lower_mean_component():
    losses = two_cluster_losses()
    prob = dm.gmm_clean_probability(losses, seed=3)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4, random_state=3)
    x = losses.numpy().reshape(-1, 1)
    gmm.fit(x)
    expected = gmm.predict_proba(x)[:, gmm.means_.argmin()]
    np.testing.assert_allclose(prob.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert prob[:300].mean() > 0.9 and prob[300:].mean() < 0.1  # small losses are judged clean


def test_gmm_is_seeded():
    losses = torch.rand(200, generator=torch.Generator().manual_seed(0)).double()
    assert torch.equal(dm.gmm_clean_probability(losses, 5), dm.gmm_clean_probability(losses, 5))


def test_losses_are_min_max_normalised_over_the_set():
    losses = torch.tensor([2.0, 4.0, 3.0, 6.0])
    np.testing.assert_allclose(dm.normalized_losses(losses).numpy(), [0.0, 0.5, 0.25, 1.0])
    assert torch.equal(dm.normalized_losses(torch.ones(3)), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("window", [1, 5])
def test_gmm_fits_the_mean_of_the_last_window_of_normalised_losses(monkeypatch, window):
    """At 90% noise (gmm_loss_epochs 5) the GMM input is the mean of the last 5 epochs' normalised losses."""
    cfg = config(noise="sym90" if window == 5 else "sym50")
    assert cfg.gmm_loss_epochs == window
    ctx = context(cfg)
    rng = np.random.default_rng(0)
    epochs = [[torch.tensor(rng.random(20) * (e + 1)) for _ in range(2)] for e in range(7)]
    seen = []
    monkeypatch.setattr(dm, "gmm_clean_probability", lambda losses, seed: seen.append(losses) or losses.float())
    data = SimpleNamespace(images=None, noisy_labels=None)
    for e, raw in enumerate(epochs):
        monkeypatch.setattr(dm, "per_sample_losses", lambda ctx, k, images, labels, raw=raw: raw[k])
        dm.clean_probabilities(ctx, [0, 1], data, e)  # "members" 0 and 1: the fake pass returns their losses
    for k in range(2):
        normalized = [(r[k] - r[k].min()) / (r[k].max() - r[k].min()) for r in epochs[-window:]]
        expected = torch.stack(normalized).mean(dim=0)
        np.testing.assert_allclose(seen[-2 + k].numpy(), expected.numpy(), rtol=1e-6)


# ---- co-divide and the plan -----------------------------------------------------------------------------------


def test_co_divide_crosses_each_network_trains_on_its_peers_division():
    g = torch.Generator().manual_seed(0)
    probs = [torch.rand(40, generator=g), torch.rand(40, generator=g)]
    labeled = [p > 0.5 for p in probs]
    plan = dm.co_divide_plan(probs, labeled, batch_size=4, epoch=3)
    net = plan.extras["net"]
    for k in range(2):
        rows = plan.index[net == k]
        peer = 1 - k
        assert labeled[peer][rows].all(), "net k's labeled rows are its PEER's labeled set"
        assert set(rows.flatten().tolist()) == set(labeled[peer].nonzero().flatten().tolist()), "one pass over it"
        assert torch.equal(plan.extras["weight"][net == k], probs[peer][rows]), "w = the peer's clean probability"
        unlabeled = plan.extras["unlabeled"][net == k]
        assert not labeled[peer][unlabeled].any()
        assert len(rows) == math.ceil(int(labeled[peer].sum()) / 4)
    assert net.tolist() == sorted(net.tolist()), "network 1's whole pass, then network 2's"


def test_plan_steps_ramp_fraction_and_unlabeled_rows_cycle_through_fresh_shuffles():
    torch.manual_seed(0)
    prob = torch.zeros(30)
    prob[:12] = 1.0  # |L| = 12, |U| = 18, B = 4: 3 steps, fraction i / (12 // 4 + 1) (the reference's num_iter)
    part = dm.member_pass(0, prob > 0.5, prob, batch_size=4, epoch=7)
    assert part["index"].shape == (3, 4)
    np.testing.assert_allclose(part["epoch_time"].numpy(), [7, 7 + 1 / 4, 7 + 2 / 4])
    assert sorted(part["index"].flatten().tolist()) == list(range(12))
    assert part["unlabeled"].shape == (3, 4) and (part["unlabeled"] >= 12).all()
    assert len(set(part["unlabeled"].flatten().tolist())) == 12, "no repeats before U is used up"


def test_last_partial_labeled_batch_is_completed_not_dropped():
    torch.manual_seed(1)
    labeled = torch.arange(30) < 10  # |L| = 10, B = 4: the reference's 3 batches (4, 4, 2)
    part = dm.member_pass(0, labeled, labeled.float(), batch_size=4, epoch=0)
    assert part["index"].shape == (3, 4)
    assert set(part["index"].flatten().tolist()) == set(range(10)), "every labeled row trains"
    assert sorted(part["index"][:2].flatten().tolist() + part["index"][2, :2].tolist()) == list(range(10))


def test_empty_labeled_set_takes_the_most_probable_batch_and_empty_unlabeled_set_mixes_labeled_rows_alone():
    prob = torch.linspace(0, 0.4, 10)
    mask = dm.labeled_mask(prob, 0.5, minimum=4)
    assert mask.sum() == 4 and mask[-4:].all()
    part = dm.member_pass(1, torch.ones(10, dtype=torch.bool), torch.ones(10), batch_size=4, epoch=0)
    assert not part["has_unlabeled"].any()


def test_warmup_plan_gives_each_network_its_own_pass_in_double_batches():
    torch.manual_seed(0)
    plan = dm.warmup_plan(num_samples=20, batch_size=8, networks=2)
    assert plan.index.shape == (6, 8)
    for k in range(2):
        assert set(plan.index[plan.extras["net"] == k].flatten().tolist()) == set(range(20))
    assert plan.extras["first"].tolist() == [True] + [False] * 5


def test_epoch_plan_runs_a_warmup_with_batches_of_twice_batch_size():
    cfg = config(warmup_epochs=2, batch_size=4)
    data = SimpleNamespace(noisy_labels=torch.zeros(20, dtype=torch.long))
    plan = dm.epoch_plan(context(cfg), [None, None], data, epoch=1)
    assert plan.index.shape[1] == 8 and "unlabeled" not in plan.extras


# ---- co-guessing, co-refinement, MixMatch, the losses ---------------------------------------------------------


def test_co_guess_is_the_sharpened_mean_of_every_softmax():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, CLASSES, generator=g) for _ in range(4)]
    p = np.mean([F.softmax(z, dim=1).numpy() for z in logits], axis=0)
    expected = p**2 / (p**2).sum(axis=1, keepdims=True)  # T = 0.5
    np.testing.assert_allclose(dm.co_guess(logits, 0.5).numpy(), expected, rtol=1e-5)


def test_co_refine_mixes_the_label_by_the_clean_probability_then_sharpens():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(3, CLASSES, generator=g) for _ in range(2)]
    labels, w = torch.tensor([0, 2, 3]), torch.tensor([1.0, 0.3, 0.0])
    p = np.mean([F.softmax(z, dim=1).numpy() for z in logits], axis=0)
    mixed = w.numpy()[:, None] * np.eye(CLASSES)[labels.numpy()] + (1 - w.numpy()[:, None]) * p
    expected = mixed**2 / (mixed**2).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dm.co_refine(logits, labels, w, 0.5).numpy(), expected, rtol=1e-5)


def test_mixmatch_lambda_is_the_larger_of_l_and_1_minus_l_of_a_beta_draw():
    draws = np.array([dm.beta_sample(4.0, torch.Generator().manual_seed(s)) for s in range(2000)])
    assert stats.kstest(draws, stats.beta(4, 4).cdf).pvalue > 0.01, "l ~ Beta(α, α)"
    x = torch.arange(8.0)[:, None]
    lams = [dm.mixmatch(x, x, 4.0, torch.Generator().manual_seed(s)).lam for s in range(200)]
    assert min(lams) >= 0.5 and max(lams) < 1
    twin = torch.Generator().manual_seed(11)
    u = torch.rand((), generator=twin, dtype=torch.float64).item()
    l_raw = stats.beta(4, 4).ppf(u)
    assert dm.mixmatch(x, x, 4.0, torch.Generator().manual_seed(11)).lam == pytest.approx(max(l_raw, 1 - l_raw))


def test_mixmatch_uses_one_permutation_over_labeled_and_unlabeled_rows():
    inputs = torch.arange(16.0)[:, None] * torch.ones(1, 3)
    targets = F.one_hot(torch.arange(16) % CLASSES, CLASSES).float()
    mixed = dm.mixmatch(inputs, targets, 4.0, torch.Generator().manual_seed(0))
    lam = mixed.lam
    partner = (mixed.inputs[:, 0] - lam * inputs[:, 0]) / (1 - lam)  # the permuted row's value
    perm = partner.round().long()
    np.testing.assert_allclose(partner.numpy(), perm.numpy(), atol=1e-4)
    assert sorted(perm.tolist()) == list(range(16)), "a permutation of all rows"
    assert (perm[:8] >= 8).any() and (perm[8:] < 8).any(), "labeled and unlabeled rows mix together"
    np.testing.assert_allclose(mixed.targets.numpy(), (lam * targets + (1 - lam) * targets[perm]).numpy(), atol=1e-6)


def test_lu_is_the_squared_error_averaged_over_rows_and_classes_and_lx_the_soft_ce():
    g = torch.Generator().manual_seed(2)
    lx_logits, lu_logits = torch.randn(6, CLASSES, generator=g), torch.randn(6, CLASSES, generator=g)
    tx, tu = torch.rand(6, CLASSES, generator=g).softmax(1), torch.rand(6, CLASSES, generator=g).softmax(1)
    loss_x, loss_u = dm.mixmatch_losses(lx_logits, tx, lu_logits, tu)
    expected_u = np.mean((F.softmax(lu_logits, 1).numpy() - tu.numpy()) ** 2)
    expected_x = -np.mean(np.sum(F.log_softmax(lx_logits, 1).numpy() * tx.numpy(), axis=1))
    assert loss_u.item() == pytest.approx(expected_u, rel=1e-5)
    assert loss_x.item() == pytest.approx(expected_x, rel=1e-5)


def test_prior_penalty_is_on_over_all_mixed_rows_even_at_lambda_u_zero():
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(10, CLASSES, generator=g), torch.rand(10, CLASSES, generator=g).softmax(1)
    terms = dm.semi_supervised_loss(logits, targets, labeled_rows=4, lambda_weight=0.0)
    mean_p = F.softmax(logits, 1).numpy().mean(axis=0)
    penalty = np.sum(1 / CLASSES * np.log((1 / CLASSES) / mean_p))
    assert terms["loss_prior"].item() == pytest.approx(penalty, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(terms["loss_x"].item() + penalty, rel=1e-5)
    weighted = dm.semi_supervised_loss(logits, targets, labeled_rows=4, lambda_weight=2.0)
    assert weighted["loss"].item() == pytest.approx(terms["loss"].item() + 2 * terms["loss_u"].item(), rel=1e-5)


def test_lambda_u_ramps_linearly_after_warmup_over_ramp_epochs():
    assert dm.lambda_u_weight(25, 9.5, warmup_epochs=10, ramp_epochs=16) == 0
    assert dm.lambda_u_weight(25, 10 + 4 / 8, warmup_epochs=10, ramp_epochs=16) == pytest.approx(25 * 0.5 / 16)
    assert dm.lambda_u_weight(25, 18, warmup_epochs=10, ramp_epochs=16) == pytest.approx(25 * 8 / 16)
    assert dm.lambda_u_weight(25, 40, warmup_epochs=10, ramp_epochs=16) == 25


def reference_member_loss(member, peer, x_views, labels, w, u_views, lam_weight, seed, temperature=0.5, alpha=4.0):
    """Train_cifar.py's train() body, written out: separate no-grad forwards (trained net in train mode, peer in
    eval mode), the reference's target formulas, Beta draw and permutation from the same generator protocol."""
    member.net.train()
    peer.net.eval()
    with torch.no_grad():
        u11, u12 = member.net(u_views[0]), member.net(u_views[1])
        u21, u22 = peer.net(u_views[0]), peer.net(u_views[1])
        pu = (u11.softmax(1) + u12.softmax(1) + u21.softmax(1) + u22.softmax(1)) / 4
        ptu = pu ** (1 / temperature)
        targets_u = ptu / ptu.sum(1, keepdim=True)
        x1, x2 = member.net(x_views[0]), member.net(x_views[1])
        px = (x1.softmax(1) + x2.softmax(1)) / 2
        px = w[:, None] * F.one_hot(labels, CLASSES).float() + (1 - w[:, None]) * px
        ptx = px ** (1 / temperature)
        targets_x = ptx / ptx.sum(1, keepdim=True)
    torch.manual_seed(seed)
    u = torch.rand((), dtype=torch.float64).item()
    lam = stats.beta(alpha, alpha).ppf(u)
    lam = max(lam, 1 - lam)
    all_inputs = torch.cat([x_views[0], x_views[1], u_views[0], u_views[1]])
    all_targets = torch.cat([targets_x, targets_x, targets_u, targets_u])
    idx = torch.randperm(len(all_inputs))
    mixed_input = lam * all_inputs + (1 - lam) * all_inputs[idx]
    mixed_target = lam * all_targets + (1 - lam) * all_targets[idx]
    logits = member.net(mixed_input)
    n = 2 * len(labels)
    lx = -torch.mean(torch.sum(F.log_softmax(logits[:n], 1) * mixed_target[:n], 1))
    lu = torch.mean((logits[n:].softmax(1) - mixed_target[n:]) ** 2)
    prior = torch.ones(CLASSES) / CLASSES
    penalty = torch.sum(prior * torch.log(prior / logits.softmax(1).mean(0)))
    peer.net.train()
    return lx + lam_weight * lu + penalty


def test_member_loss_matches_the_reference_step_and_leaves_the_peer_bn_alone():
    cfg = config()
    ctx = context(cfg)
    g = torch.Generator().manual_seed(4)
    x_views = (torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g))
    u_views = (torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g))
    labels, w = torch.tensor([0, 1, 2, 3]), torch.tensor([0.9, 0.2, 0.6, 1.0])
    ours = [mlp_member(0), mlp_member(1)]
    theirs = [mlp_member(0), mlp_member(1)]
    peer_stats = ours[1].net[2].running_mean.clone()

    torch.manual_seed(9)
    terms = dm.mixmatch_member_loss(ctx, ours[0], ours[1], x_views, labels, w, u_views, lambda_weight=3.0)
    expected = reference_member_loss(theirs[0], theirs[1], x_views, labels, w, u_views, 3.0, seed=9)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    bn, bn_ref = ours[0].net[2], theirs[0].net[2]
    assert bn.num_batches_tracked.item() == 5, "u1, u2, x1, x2 (no-grad, train mode) and the mixed batch"
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(ours[1].net[2].running_mean, peer_stats), "the peer runs in eval mode"
    assert ours[1].net.training, "the peer's mode is restored"
    terms["loss"].backward()
    assert all(p.grad is None for p in ours[1].net.parameters()), "no gradient reaches the peer"


def test_member_loss_without_unlabeled_rows_mixes_the_labeled_rows_alone():
    ctx = context(config())
    x_views = (torch.randn(4, 6), torch.randn(4, 6))
    terms = dm.mixmatch_member_loss(
        ctx, mlp_member(0), mlp_member(1), x_views, torch.tensor([0, 1, 2, 3]), torch.ones(4), None, 5.0
    )
    assert terms["loss_u"].item() == 0 and torch.isfinite(terms["loss"])


def test_warmup_adds_the_negative_entropy_for_asymmetric_noise_only():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    p = F.softmax(logits, 1).numpy()
    assert dm.negative_entropy(logits).item() == pytest.approx(np.sum(p * np.log(p)), rel=1e-6)
    assert dm.is_asymmetric(config(noise="asym40")) and not dm.is_asymmetric(config(noise="sym40"))


# ---- the step, the signals, the reference values --------------------------------------------------------------


def test_step_trains_only_the_network_the_plan_names_and_records_the_selection_for_every_sample():
    cfg = config(batch_size=4, warmup_epochs=0)
    ctx = context(cfg)
    torch.manual_seed(0)
    ctx.train_images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    members = [mlp_member(0, 192), mlp_member(1, 192)]
    ctx.method_state = {"selection": torch.linspace(0, 1, 12), "eval_loss": torch.ones(12)}
    ctx.signals = EpochSignals(12, CLASSES)
    prob = torch.tensor([1.0] * 4 + [0.0] * 8)
    plan = dm.co_divide_plan([prob, prob], [prob > 0.5] * 2, batch_size=4, epoch=5)
    before = [[p.clone() for p in m.net.parameters()] for m in members]
    i = int((plan.extras["net"] == 1).nonzero()[0])  # net 2's first step
    index = plan.index[0]
    batch = StepInputs(ctx.train_images[index], torch.tensor([0, 1, 2, 3]), index, 5.0, extras=plan.step_extras(0))
    logs = dm.step(ctx, members, batch)
    assert torch.equal(ctx.signals.values["selection"], torch.linspace(0, 1, 12))
    assert {"loss", "loss_x", "loss_u", "loss_prior", "lambda_u"} <= set(logs)
    changed = [any(not torch.equal(a, b) for a, b in zip(old, m.net.parameters())) for old, m in zip(before, members)]
    assert changed == [True, False]
    assert not plan.extras["first"][i]


@pytest.mark.parametrize(
    ("dataset", "noise", "lambda_u", "p_threshold", "window"),
    [
        ("cifar10", "sym20", 0, 0.5, 1),
        ("cifar10", "sym50", 25, 0.5, 1),
        ("cifar10", "sym80", 25, 0.5, 1),
        ("cifar10", "sym90", 50, 0.6, 5),
        ("cifar10", "asym40", 0, 0.5, 1),
        ("cifar100", "sym20", 25, 0.5, 1),
        ("cifar100", "sym50", 150, 0.5, 1),
        ("cifar100", "sym80", 150, 0.5, 1),
        ("cifar100", "sym90", 150, 0.6, 5),
    ],
)
def test_reference_hyper_parameters_by_dataset_and_noise(dataset, noise, lambda_u, p_threshold, window):
    cfg = build_config(overrides={"method": "dividemix", "dataset": dataset, "noise": noise})
    assert (cfg.lambda_u, cfg.p_threshold, cfg.gmm_loss_epochs) == (lambda_u, p_threshold, window)
    assert cfg.mixup_alpha == 4.0 and cfg.sharpen_temperature == 0.5
    user = build_config(overrides={"method": "dividemix", "dataset": dataset, "noise": noise, "lambda_u": 7.0})
    assert user.lambda_u == 7.0, "a value the user sets wins"


def test_configs_hold_the_reference_schedule():
    for dataset, warmup in (("cifar10", 10), ("cifar100", 30)):
        cfg = build_config(f"configs/{dataset}_dividemix.yaml")
        assert (cfg.epochs, cfg.lr, cfg.lr_milestones, cfg.lr_gamma, cfg.batch_size) == (300, 0.02, [150], 0.1, 64)
        assert (cfg.momentum, cfg.weight_decay, cfg.warmup_epochs, cfg.ramp_epochs) == (0.9, 5e-4, warmup, 16)


def test_registry_row_sums_the_two_networks_logits_and_trains_in_one_process():
    spec = METHODS["dividemix"]
    assert (spec.module, spec.networks, spec.test_rule, spec.data_parallel, spec.meta) == (
        "dividemix",
        2,
        "sum",
        False,
        False,
    )


# ---- end to end -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dividemix_trains_records_selection_auroc_and_resumes(make_cifar_root, tmp_path):
    root = make_cifar_root(200, 60)
    args = ["train", "--data-root", str(root), "--method", "dividemix", "--out-dir", str(tmp_path), "--name", "dm"]
    args += tiny_train_args(hrp=True)
    assert main([*args, "--epochs", "2"]) == 0
    run = tmp_path / "dm"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["selection_auroc"] == "", "warm-up: no GMM yet"
    assert 0 <= float(rows[1]["selection_auroc"]) <= 100
    assert rows[1]["loss_x"] != "" and rows[1]["loss_prior"] != ""
    state = load_checkpoint(run / "last.pt")
    assert len(state["nets"]) == 2 and len(state["optimizers"]) == 2
    assert "selection" in state["method_state"]
    resume = ["train", "--out-dir", str(tmp_path), "--name", "dm", "--resume", "--epochs", "3", "--no-progress"]
    assert main(resume) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
