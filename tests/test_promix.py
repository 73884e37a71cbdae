"""ProMix (hrp_ood/trainers/promix.py) against independent computations: the class-wise small-loss selection (numpy
brute force), the ρ ramp, matched high-confidence selection, label guessing by agreement, the logit adjustment and
debiased pseudo-labels (by hand), the class prior's EMA, Mixup's λ = max(λ, 1 − λ), FMix, the unchosen weight's
schedule, each network trained on its OWN selection (brute-force autograd), and an end-to-end run with resume."""

from __future__ import annotations

import copy
import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_args
from hrp_ood.train.trainer import build_members
from scipy.stats import beta as beta_distribution

from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.config import build_config
from hrp_ood.data.augment import BatchAugment
from hrp_ood.registry import METHODS
from hrp_ood.trainers import promix
from hrp_ood.trainers.base import StepContext, StepInputs
from hrp_ood.trainers.signals import EpochSignals

CLASSES = 4


def make_cfg(**overrides):
    return build_config(
        overrides={"method": "promix", "model": "small_cnn", "device": "cpu", "strong_policy": "none", **overrides}
    )


def make_ctx(cfg):
    # no crop, no flip: the weak view is the normalised image, so a test can recompute the step's forwards
    augment = BatchAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, padding=0, strong_policy="none", flip=False)
    empty = torch.zeros(0, dtype=torch.long)
    return StepContext(cfg, augment, torch.zeros(0, 3, 32, 32, dtype=torch.uint8), empty, autocast_device=None)


def random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


# ---- class-wise small-loss selection ---------------------------------------------------------------------------


def brute_force_css(losses, labels, rho, num_classes):
    """Per class j: the max(min(ceil(N/K·ρ), N_j), 1) smallest losses, in plain numpy loops."""
    losses, labels = np.asarray(losses), np.asarray(labels)
    chosen = np.zeros(len(labels), dtype=bool)
    quota = math.ceil(len(labels) / num_classes * rho)
    for j in range(num_classes):
        rows = np.where(labels == j)[0]
        if len(rows) == 0:
            continue
        take = max(min(quota, len(rows)), 1)
        chosen[rows[np.argsort(losses[rows], kind="stable")[:take]]] = True
    return chosen


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.7, 1.0])
def test_class_wise_selection_matches_numpy_brute_force(rho):
    g = torch.Generator().manual_seed(3)
    # imbalanced noisy classes, one class with a single row, one absent
    labels = torch.cat([torch.full((n,), j) for j, n in enumerate([30, 12, 1, 0, 17])])
    labels = labels[torch.randperm(len(labels), generator=g)]
    losses = torch.rand(len(labels), generator=g)
    chosen = promix.class_wise_small_loss(losses, labels, rho, 5)
    expected = brute_force_css(losses.numpy(), labels.numpy(), rho, 5)
    assert np.array_equal(chosen.numpy(), expected)
    # a global top-ρ selection differs on these classes: the test tells the two apart
    global_top = torch.zeros_like(chosen)
    global_top[losses.argsort()[: math.ceil(rho * len(labels))]] = True
    assert rho == 1.0 or not torch.equal(global_top, chosen)


def test_class_quota_is_rho_n_over_k_not_rho_n_j():
    # N = 10, K = 2, ρ = 0.5: the quota is ⌈0.5·10/2⌉ = 3 rows per class (class 1 has only 2: both)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    losses = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 5.0, 6.0])
    chosen = promix.class_wise_small_loss(losses, labels, 0.5, 2)
    assert chosen.tolist() == [False, True, False, True, False, True, False, False, True, True]


def test_rho_ramps_linearly_over_the_ramp_epochs():
    cfg = make_cfg(promix_rho_start=0.2, promix_rho_end=0.6, promix_ramp_epochs=50)
    ratios = [promix.selection_ratio(cfg, e) for e in (0, 10, 25, 50, 51, 400)]
    assert ratios == pytest.approx([0.2, 0.28, 0.4, 0.6, 0.6, 0.6])


def test_epoch_plan_gives_each_network_its_own_selection():
    cfg = make_cfg(batch_size=8, warmup_epochs=2, promix_rho_start=0.5, promix_rho_end=0.5)
    ctx = make_ctx(cfg)
    torch.manual_seed(0)
    members = build_members(cfg, CLASSES, torch.device("cpu"))
    images = random_images(40)
    labels = torch.arange(40) % CLASSES
    data = SimpleNamespace(images=images, noisy_labels=labels, num_classes=CLASSES)
    assert "chosen" not in promix.epoch_plan(ctx, members, data, epoch=1).extras  # warm-up: plain batches

    expected = []
    for m in members:
        m.net.eval()
        with torch.no_grad():
            losses = F.cross_entropy(m.net(ctx.augment.normalize(images)), labels, reduction="none")
        m.net.train()
        expected.append(torch.from_numpy(brute_force_css(losses.numpy(), labels.numpy(), 0.5, CLASSES)))
    assert not torch.equal(expected[0], expected[1])  # the networks disagree: own vs peer is visible
    plan = promix.epoch_plan(ctx, members, data, epoch=2)
    assert plan.index.shape == (5, 8)
    for k in range(2):
        assert torch.equal(plan.extras["chosen"][:, k], expected[k][plan.index])
        assert torch.equal(plan.state["chosen"][k], expected[k])


# ---- matched high confidence and label guessing ----------------------------------------------------------------


def test_confident_rows_on_the_given_label_join_the_selection():
    cfg = make_cfg(promix_tau=0.99)
    labels = torch.tensor([0, 1, 2, 0, 1])
    own = torch.tensor(
        [
            [0.995, 0.003, 0.002],  # p(label) > τ: joins
            [0.005, 0.99, 0.005],  # exactly τ: not (strictly greater)
            [0.999, 0.0005, 0.0005],  # confident, but on another class: not
            [0.3, 0.4, 0.3],  # already in the base selection
            [0.2, 0.5, 0.3],
        ]
    )
    peer = torch.tensor([[0.0, 0.0, 1.0]] * 5)  # the peer's confidence plays no part
    base = torch.tensor([False, False, False, True, False])
    guessed = torch.tensor([2, 2, 1, 2, 2])
    selection = promix.select_rows(cfg, base, (own, peer), 0, labels, guessed, guessing=False)
    assert selection.chosen.tolist() == [True, False, False, True, False]
    assert selection.classes.tolist() == [0, 2, 1, 0, 2]  # given labels on the labeled rows
    selection_peer_probs = promix.select_rows(cfg, base, (peer, own), 1, labels, guessed, guessing=False)
    assert selection_peer_probs.chosen.tolist() == selection.chosen.tolist()  # network k reads probs[k]


def brute_force_guessing(chosen, p_a, p_b, tau, fill):
    chosen = chosen.copy()
    n = len(chosen)
    if chosen.sum() / n >= fill:
        return chosen
    s_a, s_b = p_a.max(1), p_b.max(1)
    candidates = [i for i in range(n) if s_a[i] > tau and s_b[i] > tau and p_a[i].argmax() == p_b[i].argmax()]
    candidates = [i for i in candidates if not chosen[i]]
    room = int(n * fill) - int(chosen.sum())
    candidates.sort(key=lambda i: -(s_a[i] + s_b[i]) / 2)
    for i in candidates[:room]:
        chosen[i] = True
    return chosen


@pytest.mark.parametrize("seed", range(6))
def test_label_guessing_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    p_a = torch.softmax(4 * torch.randn(n, 3, generator=g), dim=1)
    p_b = torch.softmax(4 * torch.randn(n, 3, generator=g), dim=1)
    chosen = torch.rand(n, generator=g) < (0.2 if seed % 2 else 0.5)
    got = promix.label_guessing(chosen, (p_a, p_b), 0.6, 0.7)
    assert np.array_equal(got.numpy(), brute_force_guessing(chosen.numpy(), p_a.numpy(), p_b.numpy(), 0.6, 0.7))
    assert not chosen.all() and got.sum() <= max(int(n * 0.7), chosen.sum())


def test_label_guessing_runs_only_in_the_last_expand_epochs():
    cfg = make_cfg(epochs=600, promix_expand_epochs=250)
    assert not promix.guessing_active(cfg, 350) and promix.guessing_active(cfg, 351)


# ---- logit adjustment, class prior, schedules --------------------------------------------------------------------


def test_logit_adjustment_and_debiased_pseudo_labels_by_hand():
    z = torch.tensor([[1.0, 2.0, 0.0]])
    prior = torch.tensor([0.5, 0.3, 0.2])
    adjusted = [1.0 + 0.8 * math.log(0.5), 2.0 + 0.8 * math.log(0.3), 0.8 * math.log(0.2)]
    assert promix.adjusted_logits(z, prior, 0.8)[0].tolist() == pytest.approx(adjusted)
    e = [math.exp(1.0 - 0.4 * math.log(0.5)), math.exp(2.0 - 0.4 * math.log(0.3)), math.exp(-0.4 * math.log(0.2))]
    assert promix.debiased_probs(z, prior, 0.4)[0].tolist() == pytest.approx([v / sum(e) for v in e])


def test_unchosen_loss_by_hand():
    """Pseudo head on the unchosen rows: targets sharpen(softmax(z − τ_pl log π^u), T) from the PRIMARY head, loss
    CE(h + τ_out log π^u) on the weak view + w × on the strong view; chosen rows do not count."""
    cfg = make_cfg(promix_debias_output=0.8, promix_debias_pl=0.5, sharpen_temperature=0.5)
    z = torch.tensor([[1.0, 0.0, -1.0], [9.0, 9.0, 9.0]])
    h_weak = torch.tensor([[0.5, 0.2, 0.1], [7.0, 0.0, 0.0]])
    h_strong = torch.tensor([[0.0, 1.0, 0.0], [0.0, 7.0, 0.0]])
    prior = torch.tensor([0.6, 0.3, 0.1])
    heads = promix.Heads(z, z, h_weak, h_strong)
    unchosen = torch.tensor([True, False])
    p = [math.exp(zc - 0.5 * math.log(pc)) for zc, pc in zip([1.0, 0.0, -1.0], prior.tolist())]
    t = [(v / sum(p)) ** 2 for v in p]
    t = [v / sum(t) for v in t]

    def ce(h):
        a = [hc + 0.8 * math.log(pc) for hc, pc in zip(h, prior.tolist())]
        log_norm = math.log(sum(math.exp(v) for v in a))
        return -sum(tc * (v - log_norm) for tc, v in zip(t, a))

    expected = ce([0.5, 0.2, 0.1]) + 0.3 * ce([0.0, 1.0, 0.0])
    assert promix.unchosen_loss(cfg, heads, unchosen, prior, 0.3).item() == pytest.approx(expected, rel=1e-5)


def test_the_pseudo_heads_unchosen_term_covers_exactly_the_rows_not_chosen():
    """member_loss hands the unchosen rows (the complement of the final selection) to the pseudo head's extra term:
    recomputed here row by row with plain tensor ops (uniform priors: the adjustment is a constant shift)."""
    cfg = make_cfg(promix_debias_output=0.8, promix_debias_pl=0.8, sharpen_temperature=0.5)
    ctx = make_ctx(cfg)
    torch.manual_seed(0)
    member = build_members(cfg, CLASSES, torch.device("cpu"))[0]
    x = ctx.augment.weak(random_images(6))
    g = torch.Generator().manual_seed(5)
    heads = promix.Heads(*(torch.randn(6, CLASSES, generator=g) for _ in range(4)))
    chosen = torch.tensor([True, True, False, True, False, False])
    selection = promix.Selection(chosen, torch.tensor([0, 1, 2, 3, 0, 1]))
    uniform = torch.full((CLASSES,), 1 / CLASSES)
    terms = promix.member_loss(ctx, member, heads, x, selection, (uniform, uniform), w=0.5, beta=0.1)
    p = heads.weak.softmax(dim=1) ** 2
    targets = p / p.sum(dim=1, keepdim=True)
    rest = ~chosen
    weak = -(targets * heads.pseudo_weak.log_softmax(dim=1)).sum(dim=1)[rest].mean()
    strong = -(targets * heads.pseudo_strong.log_softmax(dim=1)).sum(dim=1)[rest].mean()
    assert terms["loss_unchosen"].item() == pytest.approx((weak + 0.5 * strong).item(), rel=1e-5)


def test_chosen_ce_is_on_the_adjusted_logits():
    cfg = make_cfg(promix_debias_output=0.8)
    ctx = make_ctx(cfg)
    torch.manual_seed(0)
    member = build_members(cfg, 3, torch.device("cpu"))[0]
    x = ctx.augment.weak(random_images(3))
    prior = torch.tensor([0.7, 0.2, 0.1])
    weak = torch.tensor([[0.3, 1.0, -0.5], [2.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    strong = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    selection = promix.Selection(torch.tensor([True, True, False]), torch.tensor([1, 0, 0]))
    terms = promix.chosen_losses(ctx, member, False, weak, strong, x, selection, prior)

    def ce(z, c):
        a = [zc + 0.8 * math.log(pc) for zc, pc in zip(z, [0.7, 0.2, 0.1])]
        return -(a[c] - math.log(sum(math.exp(v) for v in a)))

    assert terms["ce"].item() == pytest.approx((ce([0.3, 1.0, -0.5], 1) + ce([2.0, 0.0, 0.0], 0)) / 2, rel=1e-6)
    assert terms["cr"].item() == pytest.approx((ce([1.0, 0.0, 0.0], 1) + ce([0.0, 1.0, 0.0], 0)) / 2, rel=1e-6)
    nobody = promix.Selection(torch.zeros(3, dtype=torch.bool), selection.classes)
    terms = promix.chosen_losses(ctx, member, False, weak, strong, x, nobody, prior)
    assert all(v.item() == 0 for v in terms.values())  # no chosen row: zero, not NaN


def test_prior_is_an_ema_of_the_mean_softmax_of_the_given_rows():
    prior = torch.full((3,), 1 / 3)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0]])
    rows = torch.tensor([True, True, False])
    got = promix.updated_prior(prior, probs, rows, 0.9)
    assert got.tolist() == pytest.approx([0.9 / 3 + 0.1 * 0.4, 0.9 / 3 + 0.1 * 0.15, 0.9 / 3 + 0.1 * 0.45])
    assert torch.equal(promix.updated_prior(prior, probs, torch.zeros(3, dtype=torch.bool), 0.9), prior)


def test_unchosen_weight_ramps_then_stops_at_twice_the_ramp():
    cfg = make_cfg(promix_ramp_epochs=50, promix_unchosen_weight=0.1, promix_debias_pl=0.8)
    weights = [promix.unchosen_weight(cfg, e) for e in (0, 10, 50, 99, 100, 101, 500)]
    assert weights == pytest.approx([0.0, 0.01, 0.05, 0.099, 0.0, 0.0, 0.0])
    assert promix.unchosen_weight(make_cfg(promix_debias_pl=0.0), 200) == 1.0  # the reference's `else 1`


# ---- Mixup and FMix ----------------------------------------------------------------------------------------------


class MixRecorder:
    def __init__(self, monkeypatch):
        self.calls = []
        original = promix.mixmatch

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls.append((args, out))
            return out

        monkeypatch.setattr(promix, "mixmatch", wrapper)


def test_mixup_lambda_is_max_of_l_and_one_minus_l(monkeypatch):
    """ProMix's Mixup on the chosen rows: l ~ Beta(4, 4) (cfg.mixup_alpha), λ = max(l, 1 − l), replayed here from
    the same generator state with scipy's Beta quantile."""
    cfg = make_cfg(mixup_alpha=4.0)
    ctx = make_ctx(cfg)
    torch.manual_seed(0)
    member = build_members(cfg, CLASSES, torch.device("cpu"))[0]
    x = ctx.augment.weak(random_images(6))
    weak = torch.zeros(6, CLASSES)
    selection = promix.Selection(torch.tensor([True, True, False, True, True, True]), torch.tensor([0, 1, 2, 3, 0, 1]))
    recorder = MixRecorder(monkeypatch)
    raw_below_half = raw_above_half = 0
    for seed in range(12):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        promix.chosen_losses(ctx, member, False, weak, weak, x, selection, torch.full((CLASSES,), 0.25))
        torch.set_rng_state(before)
        u = torch.rand((), dtype=torch.float64).item()
        raw = beta_distribution.ppf(u, 4, 4)
        raw_below_half += raw < 0.5
        raw_above_half += raw > 0.5
        (inputs, targets, _), mixed = recorder.calls[-1]
        assert mixed.lam == pytest.approx(max(raw, 1 - raw), rel=1e-9)
        perm = torch.randperm(len(inputs))
        assert torch.allclose(mixed.inputs, mixed.lam * inputs + (1 - mixed.lam) * inputs[perm])
        assert torch.equal(inputs, x[selection.chosen])  # the chosen rows' weak views
    assert raw_below_half and raw_above_half


def test_fmix_mask_and_loss():
    torch.manual_seed(0)
    for lam in (0.0, 0.3, 0.61, 1.0):
        mask = promix.fmix_mask(32, 32, lam)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask.sum().item() in (math.floor(lam * 1024), math.ceil(lam * 1024))
    x = torch.randn(5, 3, 32, 32)
    mixed = promix.fmix(x)
    inside = (mixed.inputs == x).all(dim=1)  # mask 1: the row's own pixels
    assert torch.equal(inside[0], inside[1])  # one mask for the whole batch
    assert torch.allclose(mixed.inputs[0][:, ~inside[0]], x[mixed.perm[0]][:, ~inside[0]])
    logits = torch.randn(5, CLASSES)
    classes = torch.tensor([0, 1, 2, 3, 0])
    log_p = logits.log_softmax(dim=1)
    own = -log_p[torch.arange(5), classes].mean()
    other = -log_p[torch.arange(5), classes[mixed.perm]].mean()
    expected = mixed.lam * own + (1 - mixed.lam) * other
    assert promix.fmix_loss(logits, classes, mixed).item() == pytest.approx(expected.item(), rel=1e-6)


# ---- the step ----------------------------------------------------------------------------------------------------


def test_each_network_trains_on_its_own_selection():
    """At epoch 0 after the warm-up (w = 0, β = 0, no LGA, τ = 1: no MHCS) network k's update is plain SGD on
    CE(primary, chosen_k) + CE(pseudo head, chosen_k) with its OWN plan rows: recomputed here by autograd."""
    n, lr = 12, 0.1
    cfg = make_cfg(batch_size=n, warmup_epochs=0, epochs=600, promix_tau=1.0, lr=lr, momentum=0.0, weight_decay=0.0)
    ctx = make_ctx(cfg)
    torch.manual_seed(0)
    members = build_members(cfg, CLASSES, torch.device("cpu"))
    images = random_images(n, seed=1)
    labels = torch.arange(n) % CLASSES
    chosen = torch.zeros(2, n, dtype=torch.bool)
    chosen[0, :4] = True
    chosen[1, 5:] = True
    batch = StepInputs(images, labels, torch.arange(n), epoch=0.0, extras={"chosen": chosen})
    x = ctx.augment.weak(images)
    expected = []
    for k, m in enumerate(members):
        net, head = copy.deepcopy(m.net), copy.deepcopy(m.head)
        logits, features = net(x, return_feature=True)
        rows = chosen[k]
        loss = F.cross_entropy(logits[rows], labels[rows]) + F.cross_entropy(head(features)[rows], labels[rows])
        params = list(net.parameters()) + list(head.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        expected.append([p - lr * g if g is not None else p for p, g in zip(params, grads)])
    promix.step(ctx, members, batch)
    for k, m in enumerate(members):
        got = list(m.net.parameters()) + list(m.head.parameters())
        for p, e in zip(got, expected[k]):
            assert torch.allclose(p, e, atol=1e-6), k


def test_step_keeps_the_priors_in_method_state_and_records_the_selection():
    n = 8
    cfg = make_cfg(batch_size=n, warmup_epochs=0, promix_tau=1.0, promix_prior_momentum=0.5)
    ctx = make_ctx(cfg)
    ctx.signals = EpochSignals(n, CLASSES)
    torch.manual_seed(0)
    members = build_members(cfg, CLASSES, torch.device("cpu"))
    labels = torch.arange(n) % CLASSES
    chosen = torch.zeros(2, n, dtype=torch.bool)
    chosen[0, :5] = True
    chosen[1, :2] = True
    x = ctx.augment.weak(random_images(n))
    probs = []
    for m in members:
        with torch.no_grad():
            probs.append(copy.deepcopy(m.net)(x).softmax(dim=1))
    promix.step(
        ctx, members, StepInputs(random_images(n), labels, torch.arange(n), epoch=3.0, extras={"chosen": chosen})
    )
    uniform = torch.full((CLASSES,), 1 / CLASSES)
    for k in range(2):
        own = probs[k][chosen[k]].mean(dim=0)
        rest = probs[k][~chosen[k]].mean(dim=0)
        assert torch.allclose(ctx.method_state["prior_chosen"][k], 0.5 * uniform + 0.5 * own, atol=1e-5)
        assert torch.allclose(ctx.method_state["prior_unchosen"][k], 0.5 * uniform + 0.5 * rest, atol=1e-5)
    assert ctx.signals.values["selection"].tolist() == [1.0, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0]


# ---- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, noise, rho, tau, debias",
    [
        ("cifar10", "sym20", 0.7, 0.99, 0.8),
        ("cifar10", "sym50", 0.5, 0.99, 0.8),
        ("cifar10", "sym80", 0.5, 0.99, 0.8),
        ("cifar10", "asym40", 0.5, 0.99, 0.8),
        ("cifar100", "sym20", 0.7, 0.95, 0.5),
        ("cifar100", "sym50", 0.5, 0.95, 0.5),
    ],
)
def test_reference_values_by_dataset_and_noise(dataset, noise, rho, tau, debias):
    cfg = build_config(overrides={"method": "promix", "dataset": dataset, "noise": noise})
    assert (cfg.promix_rho_start, cfg.promix_rho_end, cfg.promix_tau) == (rho, rho, tau)
    assert (cfg.promix_debias_output, cfg.promix_debias_pl) == (debias, debias)
    assert build_config(overrides={"method": "promix", "noise": noise, "promix_tau": 0.9}).promix_tau == 0.9


def test_pseudo_head_and_test_rule():
    cfg = make_cfg()
    member = build_members(cfg, CLASSES, torch.device("cpu"))[0]
    assert isinstance(member.head, torch.nn.Linear)
    assert (member.head.in_features, member.head.out_features) == (member.net.num_features, CLASSES)
    assert any(p is member.head.weight for g in member.optimizer.param_groups for p in g["params"])
    assert METHODS["promix"].test_rule == "mean" and not METHODS["promix"].needs_meta_set


# ---- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_promix_trains_records_the_selection_and_resumes(make_cifar_root, tmp_path):
    root = make_cifar_root(200, 60)
    args = ["train", "--data-root", str(root), "--method", "promix", "--out-dir", str(tmp_path), "--name", "run"]
    assert main([*args, "--epochs", "3", *tiny_train_args(hrp=True)]) == 0
    run = tmp_path / "run"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["selection_auroc"] == ""  # warm-up: no selection
    for row in rows[1:]:
        assert row["selection_auroc"] != "" and row["loss_fmix"] != "" and row["loss_unchosen"] != ""
    state = load_checkpoint(run / "last.pt")
    assert len(state["nets"]) == 2 and all(set(h) == {"weight", "bias"} for h in state["heads"])
    prior = state["method_state"]["prior_chosen"]
    assert prior.shape == (2, 10) and torch.allclose(prior.sum(dim=1), torch.ones(2))
    assert (
        main(["train", "--out-dir", str(tmp_path), "--name", "run", "--resume", "--epochs", "4", "--no-progress"]) == 0
    )
    after = load_checkpoint(run / "last.pt")
    assert after["epoch"] == 4
    assert not torch.equal(after["method_state"]["prior_chosen"], prior)  # π carried on and kept moving
