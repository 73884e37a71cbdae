"""UNICON (hrp_ood/trainers/unicon.py) against independent computations of the reference's rules
(nazmul-karim170/UNICON-Noisy-Label @ 616dc49, Train_cifar.py, dataloader_cifar.py, Contrastive_loss.py): the JSD of
the MEAN of both networks' softmax against the one-hot label (scipy), the threshold with its lowering above d_u, the
per-class quota (numpy brute force), the co-refinement weight, the unlabeled batch size, SimCLR (a double loop), weak
views for co-guessing and co-refinement and strong views for MixMatch and SimCLR, the plan, the reference values, the
configs, and an end-to-end run with resume."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_train_args
from scipy.spatial.distance import jensenshannon
from torch import nn

import hrp_ood.trainers.unicon as un
from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.config import build_config
from hrp_ood.data.augment import BatchAugment
from hrp_ood.models import create_model
from hrp_ood.registry import METHODS
from hrp_ood.trainers.base import Member, StepContext, StepInputs
from hrp_ood.trainers.signals import EpochSignals

CLASSES = 4


def config(**overrides):
    values = {"method": "unicon", "model": "small_cnn", "device": "cpu", "batch_size": 4, "warmup_epochs": 1}
    return build_config(overrides={**values, **overrides})


def context(cfg, augment=None) -> StepContext:
    augment = augment or BatchAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 8, strong_policy="none")
    return StepContext(cfg, augment, torch.zeros(0), torch.zeros(0), autocast_device=None)


def cnn_member(seed: int, cfg) -> Member:
    """A tiny small_cnn (BatchNorm: modes matter) with UNICON's projection head, one optimiser for both."""
    torch.manual_seed(seed)
    net = create_model("small_cnn", num_classes=CLASSES, widths=(4, 4, 8))
    head = un.projection_head(cfg, net)
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    return Member(net, head, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0))


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[labels]


# ---- the JSD --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "base"), [(False, None), (True, 2)])
def test_jsd_is_scipys_squared_jensen_shannon_distance_to_the_one_hot_label(bits, base):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(7, 0.3), size=200)
    probs[:3] = one_hot(np.array([0, 1, 2]), 7)  # p_y = 1 and p_y = 0 rows
    labels = rng.integers(0, 7, 200)
    labels[:3] = [0, 5, 2]
    expected = jensenshannon(probs, one_hot(labels, 7), axis=1, base=base) ** 2  # scipy returns the square root
    got = un.jsd_to_label(torch.tensor(probs), torch.tensor(labels), bits=bits)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert got[0] == 0 and got[1] == pytest.approx(1.0 if bits else math.log(2))


def test_selection_is_the_jsd_of_the_mean_of_both_networks_eval_mode_softmax():
    cfg = config(batch_size=4)
    ctx = context(cfg)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(24) % CLASSES
    members = [cnn_member(0, cfg), cnn_member(1, cfg)]
    for m in members:  # running statistics unlike a batch's: a train-mode pass would give other outputs
        for module in m.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.fill_(0.3)
                module.running_var.fill_(2.0)
    data = SimpleNamespace(images=images, noisy_labels=labels, num_classes=CLASSES)
    with torch.no_grad():
        x = ctx.augment.normalize(images)
        softmax = [m.net.eval()(x).softmax(dim=1).double().numpy() for m in members]
    for m in members:
        m.net.train()
    un.uniform_division(ctx, members, data)
    expected = jensenshannon((softmax[0] + softmax[1]) / 2, one_hot(labels.numpy(), CLASSES), axis=1) ** 2
    np.testing.assert_allclose(1 - ctx.method_state["selection"].numpy(), expected, atol=1e-5)
    assert all(m.net.training for m in members), "the networks' modes are restored"


# ---- threshold, quota, weights, unlabeled batch ----------------------------------------------------------------


def test_threshold_is_the_mean_jsd_at_or_below_d_u():
    jsd = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.8])  # mean 0.4
    assert un.selection_threshold(jsd, d_u=0.7, tau=5) == pytest.approx(0.4)
    assert un.selection_threshold(torch.full((3,), 0.7), d_u=0.7, tau=5) == pytest.approx(0.7), "not lowered at d_u"


def test_threshold_above_d_u_is_lowered_by_the_mean_minus_the_min_over_tau():
    jsd = torch.tensor([0.5, 0.76, 0.9, 1.0])  # mean 0.79 > 0.7: 0.79 − (0.79 − 0.5) / 5 = 0.732
    assert un.selection_threshold(jsd, d_u=0.7, tau=5) == pytest.approx(0.732)
    assert un.selection_threshold(jsd, d_u=0.7, tau=2) == pytest.approx(0.645)
    assert un.selection_threshold(jsd, d_u=0.8, tau=5) == pytest.approx(0.79)


def test_selected_ratio_counts_the_samples_strictly_below_the_threshold():
    jsd = torch.tensor([0.1, 0.3, 0.3, 0.5])  # mean 0.3: the ties at the threshold are not selected
    assert un.selected_ratio(jsd, un.selection_threshold(jsd, d_u=0.7, tau=5)) == 0.25


def brute_force_uniform_selection(jsd: np.ndarray, labels: np.ndarray, classes: int, quota: int) -> np.ndarray:
    mask = np.zeros(len(jsd), dtype=bool)
    for c in range(classes):
        members = [i for i in range(len(jsd)) if labels[i] == c]
        members.sort(key=lambda i: jsd[i])
        for i in members[:quota]:
            mask[i] = True
    return mask


@pytest.mark.parametrize("quota", [0, 3, 12, 40])
def test_uniform_selection_takes_each_class_lowest_jsd_up_to_the_quota(quota):
    rng = np.random.default_rng(quota)
    labels = np.concatenate([np.full(30, 0), np.full(25, 1), np.full(8, 2), np.full(37, 3)])
    rng.shuffle(labels)
    jsd = rng.random(len(labels)) + 0.5 * (labels == 3)  # class 3 is hard: a global cut would take few of it
    got = un.uniform_selection(torch.tensor(jsd), torch.tensor(labels), CLASSES, quota).numpy()
    np.testing.assert_array_equal(got, brute_force_uniform_selection(jsd, labels, CLASSES, quota))
    assert got.sum() == sum(min(quota, int((labels == c).sum())) for c in range(CLASSES))


def test_class_quota_is_the_reference_class_len_with_at_least_one_batch():
    assert un.class_quota(0.42, 50_000, 10, 64) == 2100  # int(SR·N / C)
    assert un.class_quota(0.333, 50_000, 100, 64) == 166
    assert un.class_quota(0.01, 100, 10, 32) == 4  # ceil(32 / 10): one labeled batch


def test_label_weight_is_one_below_half_else_one_minus_jsd():
    jsd = torch.tensor([0.0, 0.2, 0.4999, 0.5, 0.6, 0.69])
    torch.testing.assert_close(un.label_weights(jsd), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.4, 0.31]))


@pytest.mark.parametrize(
    ("ratio", "unlabeled", "expected"),
    [(0.5, 10_000, 64), (0.2, 40_000, 160), (0.3, 35_000, 106), (0.9, 5_000, 35), (0.1, 100, 100), (0.0, 50, 50)],
)
def test_unlabeled_batch_is_int_b_over_twice_the_selected_ratio_at_most_the_unlabeled_set(ratio, unlabeled, expected):
    assert un.unlabeled_batch_size(64, ratio, unlabeled) == expected


# ---- the plan -------------------------------------------------------------------------------------------------


def test_plan_divides_once_and_gives_each_network_its_own_shuffles_of_the_same_division(monkeypatch):
    cfg = config(batch_size=3, warmup_epochs=2)
    ctx = context(cfg)
    n = 40
    labels = torch.arange(n) % CLASSES
    rng = np.random.default_rng(1)
    p_label = torch.tensor(rng.random(n))
    probs = torch.where(torch.arange(CLASSES) == labels[:, None], p_label[:, None], (1 - p_label[:, None]) / 3)
    monkeypatch.setattr(un, "mean_softmax_and_loss", lambda ctx, members, images, y: (probs, torch.ones(n)))
    data = SimpleNamespace(images=torch.zeros(n, 3, 8, 8, dtype=torch.uint8), noisy_labels=labels, num_classes=4)
    plan = un.epoch_plan(ctx, [None, None], data, epoch=3)

    jsd = jensenshannon(probs.numpy(), one_hot(labels.numpy(), CLASSES), axis=1) ** 2
    np.testing.assert_allclose(ctx.method_state["selection"].numpy(), 1 - jsd, atol=1e-6)
    ratio = float(np.mean(jsd < jsd.mean()))
    labeled = brute_force_uniform_selection(jsd, labels.numpy(), CLASSES, int(ratio * n / CLASSES))
    per_net = int(labeled.sum()) // 3  # the last partial batch is dropped
    assert labeled.sum() % 3, "a partial last batch to drop"
    net = plan.extras["net"]
    assert torch.equal(net, torch.tensor([0] * per_net + [1] * per_net))
    for k in (0, 1):
        rows = plan.index[net == k]
        assert sorted(rows.flatten().tolist()) == sorted(set(rows.flatten().tolist()))  # one shuffle, no repeats
        assert set(rows.flatten().tolist()) <= set(np.flatnonzero(labeled).tolist())
        unlabeled = plan.extras["unlabeled"][net == k]
        assert unlabeled.shape == (per_net, int(3 / (2 * ratio)))
        assert set(unlabeled.flatten().tolist()) <= set(np.flatnonzero(~labeled).tolist())
        weight = np.where(jsd < 0.5, 1.0, 1 - jsd)[rows.numpy()]
        np.testing.assert_allclose(plan.extras["weight"][net == k].numpy(), weight, atol=1e-6)
        fraction = plan.extras["epoch_time"][net == k] - 3
        torch.testing.assert_close(fraction, torch.arange(per_net).double() / (per_net + 1))
    assert plan.extras["first"].tolist() == [True] + [False] * (2 * per_net - 1)
    assert plan.extras["selected_ratio"][0].item() == pytest.approx(ratio)


def test_warmup_epochs_plan_each_network_a_ce_pass_in_double_batches():
    cfg = config(batch_size=4, warmup_epochs=2)
    data = SimpleNamespace(images=None, noisy_labels=torch.zeros(24, dtype=torch.long), num_classes=4)
    plan = un.epoch_plan(context(cfg), [None, None], data, epoch=1)
    assert plan.index.shape == (6, 8) and "unlabeled" not in plan.extras


# ---- SimCLR ---------------------------------------------------------------------------------------------------


def brute_force_simclr(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    z = np.concatenate([z1, z2])
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        denominator = 0.0
        for k in range(2 * n):
            if k != a:
                denominator += math.exp(float(z[a] @ z[k]) / temperature)
        total += -(float(z[a] @ z[positive]) / temperature - math.log(denominator))
    return total / (2 * n)


def test_simclr_loss_matches_a_double_loop_over_anchors_and_contrasts():
    g = torch.Generator().manual_seed(0)
    z1 = nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    z2 = nn.functional.normalize(z1 + 0.5 * torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    for temperature in (0.05, 0.5):
        expected = brute_force_simclr(z1.numpy(), z2.numpy(), temperature)
        assert un.simclr_loss(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-9)


def test_projection_is_linear_then_batch_norm_then_unit_norm():
    cfg = config(proj_dim=16)
    head = un.projection_head(cfg, create_model("small_cnn", num_classes=CLASSES, widths=(4, 4, 8)))
    h = torch.randn(10, 8)
    z = head(h)
    linear = h @ head.linear.weight.T + head.linear.bias
    normed = (linear - linear.mean(0)) / torch.sqrt(linear.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(z, nn.functional.normalize(normed, dim=1))
    assert z.shape == (10, 16)


# ---- the step: which views go where ---------------------------------------------------------------------------


class TaggingAugment:
    """Views whose pixel values say what they are: weak = image + 0.25, strong = image + 0.5 (images are constant
    per batch: 10 for labeled rows, 20 for unlabeled ones)."""

    def weak(self, images):
        return images.float() + 0.25

    def strong(self, images):
        return images.float() + 0.5

    def normalize(self, images):
        return images.float()


def recorded_forwards(member: Member) -> list[tuple[torch.Tensor, bool, bool]]:
    """(distinct input values, grad enabled, features asked for) of every forward of the member's network."""
    calls: list[tuple[torch.Tensor, bool, bool]] = []

    def record(module, args, kwargs):
        calls.append((args[0].unique(), torch.is_grad_enabled(), kwargs.get("return_feature", False)))

    member.net.register_forward_pre_hook(record, with_kwargs=True)
    return calls


def ssl_step_setup(n_labeled=4, n_unlabeled=6, **overrides):
    cfg = config(batch_size=n_labeled, warmup_epochs=0, **overrides)
    ctx = context(cfg, TaggingAugment())
    ctx.train_images = torch.cat(
        [
            torch.full((n_labeled, 3, 8, 8), 10, dtype=torch.uint8),
            torch.full((n_unlabeled, 3, 8, 8), 20, dtype=torch.uint8),
        ]
    )
    ctx.signals = EpochSignals(n_labeled + n_unlabeled, CLASSES)
    members = [cnn_member(0, cfg), cnn_member(1, cfg)]
    extras = {
        "net": torch.tensor(0),
        "unlabeled": torch.arange(n_labeled, n_labeled + n_unlabeled),
        "has_unlabeled": torch.tensor(n_unlabeled > 0),
        "weight": torch.tensor([1.0, 0.5, 0.8, 1.0][:n_labeled]),
        "epoch_time": torch.tensor(20.0, dtype=torch.float64),
        "first": torch.tensor(False),
        "selected_ratio": torch.tensor(0.5),
        "jsd_threshold": torch.tensor(0.3),
    }
    index = torch.arange(n_labeled)
    batch = StepInputs(ctx.train_images[index], index % CLASSES, index, 20.0, extras=extras)
    return ctx, members, batch


def test_co_guessing_and_co_refinement_read_weak_views_and_mixmatch_and_simclr_strong_views():
    ctx, members, batch = ssl_step_setup()
    own, peer = recorded_forwards(members[0]), recorded_forwards(members[1])
    logs = un.step(ctx, members, batch)
    weak_x, weak_u, strong_x, strong_u = 10.25, 20.25, 10.5, 20.5
    targets = [values.tolist() for values, grad, _ in own if not grad]
    assert targets == [[weak_u], [weak_u], [weak_x], [weak_x]], "co-guessing (unlabeled), co-refinement (labeled)"
    assert [(values.tolist(), grad) for values, grad, _ in peer] == [([weak_u], False)], "the peer co-guesses"
    simclr = [values.tolist() for values, grad, features in own if grad and features]
    assert simclr == [[strong_u], [strong_u]], "SimCLR: the unlabeled rows' two strong views, one forward each"
    mixed = [values for values, grad, features in own if grad and not features]
    assert len(mixed) == 1
    # l·a + (1 − l)·b of the strong views only: a weak view would bring values off this set
    lam = logs["lam"].item()
    possible = torch.tensor(
        [strong_x, strong_u, lam * strong_x + (1 - lam) * strong_u, lam * strong_u + (1 - lam) * strong_x]
    )
    assert (mixed[0][:, None] - possible[None, :]).abs().min(dim=1).values.max() < 1e-4


def test_step_loss_adds_the_weighted_simclr_term_and_trains_only_the_named_network():
    ctx, members, batch = ssl_step_setup(lambda_supcon=0.5)
    before = [[p.clone() for p in m.net.parameters()] for m in members]
    head_before = [p.clone() for p in members[0].head.parameters()]
    logs = un.step(ctx, members, batch)
    lam_u = 30.0 * min(1.0, 20.0 / 16)
    expected = logs["loss_x"] + lam_u * logs["loss_u"] + logs["loss_prior"] + 0.5 * logs["loss_supcon"]
    assert logs["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["lambda_u"].item() == pytest.approx(lam_u) and logs["loss_supcon"].item() > 0
    changed = [any(not torch.equal(a, b) for a, b in zip(old, m.net.parameters())) for old, m in zip(before, members)]
    assert changed == [True, False]
    assert any(not torch.equal(a, b) for a, b in zip(head_before, members[0].head.parameters())), "the head learns"


def test_step_without_unlabeled_rows_has_no_simclr_term():
    ctx, members, batch = ssl_step_setup(n_unlabeled=0)
    batch.extras["unlabeled"] = torch.arange(4)
    logs = un.step(ctx, members, batch)
    assert logs["loss_supcon"].item() == 0 and logs["loss_u"].item() == 0 and torch.isfinite(logs["loss"])


# ---- reference values, configs, registry ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "noise"),
    [(d, n) for d in ("cifar10", "cifar100") for n in ("sym20", "sym50", "sym80", "sym90", "asym40")]
    + [("svhn", "sym50")],
)
def test_lambda_u_is_the_reference_30_at_every_noise_level(dataset, noise):
    cfg = build_config(overrides={"method": "unicon", "dataset": dataset, "noise": noise})
    assert cfg.lambda_u == 30.0 and cfg.mixup_alpha == 4.0 and cfg.sharpen_temperature == 0.5
    assert (cfg.unicon_d_u, cfg.unicon_tau, cfg.lambda_supcon, cfg.supcon_temperature) == (0.7, 5.0, 0.025, 0.05)
    assert build_config(overrides={"method": "unicon", "dataset": dataset, "lambda_u": 7.0}).lambda_u == 7.0


def test_configs_hold_the_reference_schedule_with_a_cosine_over_the_whole_run():
    for dataset, warmup in (("cifar10", 10), ("cifar100", 30)):
        cfg = build_config(f"configs/{dataset}_unicon.yaml")
        assert (cfg.method, cfg.epochs, cfg.lr, cfg.lr_schedule, cfg.lr_min, cfg.batch_size) == (
            "unicon",
            350,
            0.02,
            "cosine",
            2e-4,
            64,
        )
        assert (cfg.momentum, cfg.weight_decay, cfg.warmup_epochs, cfg.ramp_epochs) == (0.9, 5e-4, warmup, 16)
        assert (cfg.strong_policy, cfg.proj_dim, cfg.lambda_u) == ("autoaugment", 128, 30.0)


def test_registry_row_sums_the_two_networks_logits_and_trains_in_one_process():
    spec = METHODS["unicon"]
    assert (spec.module, spec.networks, spec.test_rule, spec.data_parallel, spec.meta, spec.cdcl) == (
        "unicon",
        2,
        "sum",
        False,
        False,
        False,
    )


# ---- end to end -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unicon_trains_records_selection_auroc_and_resumes(make_cifar_root, tmp_path):
    root = make_cifar_root(200, 60)
    args = ["train", "--data-root", str(root), "--method", "unicon", "--out-dir", str(tmp_path), "--name", "un"]
    args += [*tiny_train_args(hrp=True), "--set", "strong_policy=autoaugment"]
    assert main([*args, "--epochs", "2"]) == 0
    run = tmp_path / "un"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["selection_auroc"] == "", "warm-up: no selection yet"
    assert 0 <= float(rows[1]["selection_auroc"]) <= 100
    for column in ("loss_x", "loss_u", "loss_prior", "loss_supcon", "selected_ratio", "jsd_threshold"):
        assert rows[1][column] != "", column
    state = load_checkpoint(run / "last.pt")
    assert len(state["nets"]) == 2 and len(state["optimizers"]) == 2
    assert all({"linear.weight", "norm.running_mean"} <= set(head) for head in state["heads"])
    assert "selection" in state["method_state"]
    resume = ["train", "--out-dir", str(tmp_path), "--name", "un", "--resume", "--epochs", "3", "--no-progress"]
    assert main(resume) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
