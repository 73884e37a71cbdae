"""The HRP step layer against independent computations: the co-training exchange (each network trains with what
its *peer* computed), the ablation switches (each changes exactly its term), and per-network augmentation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hrp_ood.train.trainer import build_members, lr_scheduler

import hrp_ood.trainers.hrp as steps_module
from hrp_ood.config import build_config
from hrp_ood.data.augment import BatchAugment
from hrp_ood.method import normalize_beta, refine_targets, reweighted_ce, total_reliability
from hrp_ood.method.reliability import Reliabilities
from hrp_ood.trainers import baselines
from hrp_ood.trainers.base import StepContext, StepInputs
from hrp_ood.trainers.hrp import step as hrp_step

N, META, CLASSES = 8, 8, 4


def make_step(method="hrp", **overrides):
    cfg = build_config(
        overrides={
            "model": "small_cnn",
            "method": method,
            "batch_size": N,
            "meta_batch_size": META,
            "warmup_epochs": 0,
            "ramp_epochs": 0,
            "proj_hidden_dim": 16,
            "proj_dim": 8,
            "strong_policy": "none",
            "device": "cpu",
            "tau_conf": 0.3,
            **overrides,
        }
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    meta_images = torch.randint(0, 256, (META, 3, 32, 32), dtype=torch.uint8, generator=g)
    meta_labels = torch.randint(0, CLASSES, (META,), generator=g)
    torch.manual_seed(1)
    members = build_members(cfg, CLASSES, torch.device("cpu"))
    augment = BatchAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, strong_policy="none")
    ctx = StepContext(cfg, augment, meta_images, meta_labels, autocast_device=None)
    batch = StepInputs(images, labels, torch.arange(N), epoch=1.0, clean_labels=labels)
    return ctx, members, batch


def given_reliabilities(monkeypatch, per_network):
    """Replace the meta step: network k's α, β are per_network[k] (a pair of (N,) tensors)."""

    def fake(ctx, k, *args):
        alpha, beta = per_network[k]
        return Reliabilities(alpha, beta, alpha, beta, alpha, beta)

    monkeypatch.setattr(steps_module, "_reliabilities", fake)


class Recorder:
    """Wraps a function of steps.py, recording every call's arguments."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        original = getattr(steps_module, name)

        def wrapper(*args, **kwargs):
            self.calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(steps_module, name, wrapper)


def record_forwards(members):
    """Each network's first training pass (weak and strong views stacked): inputs and detached logits."""
    seen = [[] for _ in members]
    for k, m in enumerate(members):

        def forward(x, return_feature=False, net=m.net, k=k):
            out = net(x, return_feature=return_feature)
            seen[k].append((x.detach().clone(), (out[0] if return_feature else out).detach().clone()))
            return out

        m.forward = forward
    return seen


def record_ce_terms(monkeypatch):
    """Each network's loss_ce, in the order the step computes them (network 1, then 2)."""
    seen = []
    member_loss = steps_module._hrp_member_loss

    def keep(*args, **kwargs):
        terms = member_loss(*args, **kwargs)
        seen.append(terms["loss_ce"].detach())
        return terms

    monkeypatch.setattr(steps_module, "_hrp_member_loss", keep)
    return seen


def test_each_network_trains_with_its_peers_targets_and_reliabilities(monkeypatch):
    ctx, members, batch = make_step()
    forwards = record_forwards(members)
    reliabilities = {
        0: (torch.full((N,), 0.25), torch.full((N,), 0.5)),
        1: (torch.full((N,), 2.0), torch.full((N,), 0.75)),
    }
    given_reliabilities(monkeypatch, reliabilities)
    targets = Recorder(monkeypatch, "refine_targets")
    totals = Recorder(monkeypatch, "total_reliability")
    hrp_step(ctx, members, batch)
    probs = [F.softmax(forwards[k][0][1][:N], dim=1) for k in range(2)]  # each network's weak-view prediction
    for k in range(2):
        peer = 1 - k
        torch.testing.assert_close(targets.calls[k][0][0], probs[peer])
        alpha, beta = totals.calls[k][0][:2]
        assert torch.equal(alpha, reliabilities[peer][0]) and torch.equal(beta, reliabilities[peer][1])


def test_reweighted_ce_of_the_step_equals_a_hand_computation(monkeypatch):
    """loss_ce of network 1 = Eq. 13 on its own weak logits with the peer's refined targets and T."""
    ctx, members, batch = make_step(method="base", ce_loss="refined")  # no RAM / CDCL: L_CE, L_cons, prior
    forwards = record_forwards(members)
    ce_terms = record_ce_terms(monkeypatch)
    hrp_step(ctx, members, batch)
    cfg = ctx.cfg
    logits = [forwards[k][0][1][:N] for k in range(2)]
    for k in range(2):
        peer_probs = logits[1 - k].softmax(dim=1)
        targets, high_conf = refine_targets(
            peer_probs, batch.noisy_labels, cfg.tau_match, cfg.tau_conf, cfg.sharpen_temperature
        )
        T = total_reliability(torch.ones(N), torch.ones(N), cfg.t_min, cfg.t_max)  # no meta: α = β = 1
        expected = reweighted_ce(logits[k], targets, T, high_conf, cfg.gamma)
        torch.testing.assert_close(ce_terms[k], expected)


@pytest.mark.parametrize(
    "method, present, absent",
    [
        ("hrp", {"loss_ram", "loss_cdcl", "gate"}, set()),
        ("hrp_no_ram", {"loss_cdcl"}, {"loss_ram", "gate"}),
        ("hrp_no_cdcl", {"loss_ram", "gate"}, {"loss_cdcl"}),
        ("base", set(), {"loss_ram", "loss_cdcl", "gate"}),
        ("base_cdcl", {"loss_cdcl"}, {"loss_ram"}),
        ("base_ram_grg", {"loss_ram", "gate"}, {"loss_cdcl"}),
    ],
)
def test_ablation_switches_remove_exactly_their_terms(method, present, absent):
    ctx, members, batch = make_step(method)
    logs = hrp_step(ctx, members, batch)
    assert present <= set(logs) and not absent & set(logs)
    assert {"loss_ce", "loss_cons"} <= set(logs)


@pytest.mark.parametrize("lambda_prior", [0.0, 0.5])
def test_the_uniform_prior_adds_its_weighted_term_only_when_on(monkeypatch, lambda_prior):
    """loss = Σ over the networks of loss_ce + λ_cons loss_cons + λ_prior loss_prior (base: no RAM, no CDCL)."""
    ctx, members, batch = make_step(method="base", lambda_prior=lambda_prior)
    member_terms = []
    member_loss = steps_module._hrp_member_loss
    monkeypatch.setattr(
        steps_module, "_hrp_member_loss", lambda *a, **k: member_terms.append(member_loss(*a, **k)) or member_terms[-1]
    )
    logs = hrp_step(ctx, members, batch)
    assert ("loss_prior" in logs) == (lambda_prior > 0)
    expected = sum(
        t["loss_ce"] + ctx.cfg.lambda_cons * t["loss_cons"] + lambda_prior * t.get("loss_prior", 0)
        for t in member_terms
    )
    torch.testing.assert_close(logs["loss"], expected.detach())


def test_grg_and_symmetric_ram_switches(monkeypatch):
    calls = {}
    for method in ("hrp", "hrp_no_grg", "hrp_sym_ram"):
        ctx, members, batch = make_step(method)
        mixups = Recorder(monkeypatch, "reliability_mixup")
        logs = hrp_step(ctx, members, batch)
        calls[method] = (mixups.calls[0][1], logs["gate"].item())
    assert calls["hrp"][0]["gated"] and not calls["hrp"][0]["symmetric"]
    assert not calls["hrp_no_grg"][0]["gated"] and calls["hrp_no_grg"][1] == 1.0
    assert calls["hrp_sym_ram"][0]["symmetric"] and calls["hrp_sym_ram"][0]["gated"]


@pytest.mark.parametrize(
    "method, normalization, expected",
    [
        ("hrp", None, "separate"),
        ("hrp", "coupled", "coupled"),
        ("coupled_meta", None, "coupled"),
        ("coupled_meta", "separate", "coupled"),
        ("hrp_meta_weighted", "separate", "coupled"),
    ],
)
def test_normalization_reaches_the_meta_step(monkeypatch, method, normalization, expected):
    """The config's `normalization` (default separate, Eq. 5) reaches both networks' reliabilities; coupled_meta
    and hrp_meta_weighted fix it to coupled.
    Coupled keeps Σ(α + β) = 2n, the mass of the separate one (so mean T and RAM's gate keep their scale)."""
    ctx, members, batch = make_step(method, **({"normalization": normalization} if normalization else {}))
    meta = Recorder(monkeypatch, "meta_reliabilities")
    logs = hrp_step(ctx, members, batch)
    assert [kwargs["normalization"] for _, kwargs in meta.calls] == [expected, expected]
    alpha, beta = logs["alpha"].item(), logs["beta"].item()
    if expected == "separate":  # Eq. 5: α has batch mean 1 in each network (β is 0 in one of them on this batch)
        assert alpha == pytest.approx(1.0, rel=1e-4)
    else:  # one normaliser: the mass of 2n splits between α and β by their meta-gradients
        assert alpha + beta == pytest.approx(2.0, rel=1e-4) and abs(alpha - 1.0) > 0.01


def test_no_meta_variant_keeps_cdcl_on():
    ctx, members, batch = make_step("hrp_no_meta", tau_conf=0.0)  # every row confident: positives exist
    logs = hrp_step(ctx, members, batch)
    assert logs["loss_cdcl"].item() > 0  # β ≡ 1 → β̂ ≡ 1: ungated, not switched off


@pytest.mark.parametrize("independent", [False, True])
def test_independent_views_per_network(independent):
    ctx, members, batch = make_step(independent_views=independent)
    torch.manual_seed(3)
    forwards = record_forwards(members)
    hrp_step(ctx, members, batch)
    same = torch.equal(forwards[0][0][0], forwards[1][0][0])
    assert same is not independent


@pytest.mark.parametrize("calibrated", [False, True])
def test_meta_calibration_reaches_the_meta_step(monkeypatch, calibrated):
    """`meta_calibration` switches the meta loss of both networks' reliabilities, and only that."""
    ctx, members, batch = make_step(meta_calibration=calibrated)
    meta = Recorder(monkeypatch, "meta_reliabilities")
    hrp_step(ctx, members, batch)
    assert len(meta.calls) == 2 and all(kwargs["calibrated"] is calibrated for _, kwargs in meta.calls)


def step_with_random_reliabilities(monkeypatch, ctx, members, batch):
    """One HRP step with α, β drawn at random per network: each network's weak logits, its (α, β) and loss_ce."""
    forwards = record_forwards(members)
    g = torch.Generator().manual_seed(5)
    reliabilities = {k: (torch.rand(N, generator=g) * 2, torch.rand(N, generator=g) * 2) for k in range(2)}
    given_reliabilities(monkeypatch, reliabilities)
    ce_terms = record_ce_terms(monkeypatch)
    hrp_step(ctx, members, batch)
    logits = [forwards[k][0][1][:N] for k in range(2)]
    return logits, reliabilities, ce_terms


@pytest.mark.parametrize("ce_loss, source", [("meta_weighted", "own"), ("meta_weighted_peer", "peer")])
def test_meta_weighted_ce_trains_on_both_labels_with_the_chosen_networks_weights(monkeypatch, ce_loss, source):
    """loss_ce of network k = (1/n) Σ α_i ℓ(ỹ_i) + β_i ℓ(ŷ_i) on its own weak logits, over the whole batch (not only
    S), with the α, β and pseudo-labels ŷ of network k itself (meta_weighted) or of its peer (meta_weighted_peer)."""
    ctx, members, batch = make_step(method="base", ce_loss=ce_loss)
    logits, reliabilities, ce_terms = step_with_random_reliabilities(monkeypatch, ctx, members, batch)
    rows = torch.arange(N)
    for k in range(2):
        weights_from = k if source == "own" else 1 - k
        log_p = logits[k].log_softmax(dim=1)
        pseudo = logits[weights_from].argmax(dim=1)
        alpha, beta = reliabilities[weights_from]
        expected = -(alpha * log_p[rows, batch.noisy_labels] + beta * log_p[rows, pseudo]).mean()
        torch.testing.assert_close(ce_terms[k], expected)
        other = reliabilities[1 - weights_from]
        assert not torch.allclose(
            expected, -(other[0] * log_p[rows, batch.noisy_labels] + other[1] * log_p[rows, pseudo]).mean()
        )


def test_meta_weighted_s_trains_only_on_s_with_each_rules_label(monkeypatch):
    """ce_loss=meta_weighted_s: loss_ce of network k = (1/|S|) Σ_{i∈S} [α_i 1(peer endorses ỹ_i) ℓ(ỹ_i)
    + β_i 1(peer confident in another class) ℓ(ŷ_i)], with k's own α, β, ŷ and S from the peer's weak view."""
    tau_conf = 0.29
    ctx, members, batch = make_step(method="base", ce_loss="meta_weighted_s", tau_conf=tau_conf)
    logits, reliabilities, ce_terms = step_with_random_reliabilities(monkeypatch, ctx, members, batch)
    rows, labels = torch.arange(N), batch.noisy_labels
    for k in range(2):
        peer_probs = logits[1 - k].softmax(dim=1)
        endorsed = (peer_probs.argmax(dim=1) == labels) | (peer_probs[rows, labels] >= 0.5)
        confident = ~endorsed & (peer_probs.max(dim=1).values >= tau_conf)
        assert endorsed.any() and confident.any() and not (endorsed | confident).all()  # every rule is exercised
        log_p = logits[k].log_softmax(dim=1)
        alpha, beta = reliabilities[k]
        own_pseudo = logits[k].argmax(dim=1)
        expected = (
            -(alpha * endorsed * log_p[rows, labels] + beta * confident * log_p[rows, own_pseudo]).sum()
            / (endorsed | confident).sum()
        )
        torch.testing.assert_close(ce_terms[k], expected)


def test_ce_meta_step_adds_a_clean_meta_batch_with_its_true_labels():
    """loss = mean CE over the noisy batch (noisy labels) and a meta batch (its clean labels), one pass; plain CE
    never draws from the meta set."""
    ctx, members, batch = make_step(method="ce_meta")
    drawn = []
    draw = ctx.sample_meta_batch
    ctx.sample_meta_batch = lambda: drawn.append(draw()) or drawn[-1]
    forwards = record_forwards(members)
    logs = baselines.STEPS["ce_meta"](ctx, members, batch)
    ((inputs, logits),) = forwards[0]
    meta_x, meta_y = drawn[0]
    assert len(inputs) == N + len(meta_y) and torch.equal(inputs[N:], meta_x)
    expected = F.cross_entropy(logits, torch.cat([batch.noisy_labels, meta_y]))
    torch.testing.assert_close(logs["loss"], expected)
    assert not torch.allclose(expected, F.cross_entropy(logits[:N], batch.noisy_labels))

    drawn.clear()
    baselines.STEPS["ce"](ctx, members, batch)
    assert drawn == []


def test_the_meta_step_sees_each_networks_weak_view_given_labels_and_own_pseudo_labels(monkeypatch):
    """Eq. 1's batch is the weak view (what the network trains L_CE on) with the given labels ỹ, and ŷ = the
    argmax of that network's weak-view prediction, the pseudo-label its peer then trains with."""
    ctx, members, batch = make_step(independent_views=True)  # a different weak view per network
    forwards = record_forwards(members)
    meta = Recorder(monkeypatch, "meta_reliabilities")
    hrp_step(ctx, members, batch)
    assert len(meta.calls) == 2
    for k, (args, _) in enumerate(meta.calls):
        net, x, noisy, pseudo = args[:4]
        inputs, logits = forwards[k][0]
        assert net is members[k].net
        assert torch.equal(x, inputs[:N]) and not torch.equal(x, forwards[1 - k][0][0][:N])
        assert torch.equal(noisy, batch.noisy_labels)
        assert torch.equal(pseudo, logits[:N].argmax(dim=1))


def test_each_networks_l_ce_ram_and_cdcl_use_the_peers_reliabilities_and_pseudo_labels(monkeypatch):
    """§3.4: network k trains with what network 1 − k computed: L_CE's refined targets and T, RAM's targets and T,
    CDCL's pseudo-labels, confidence and β̂."""
    ctx, members, batch = make_step()
    forwards = record_forwards(members)
    g = torch.Generator().manual_seed(7)
    reliabilities = {k: (torch.rand(N, generator=g) * 2, torch.rand(N, generator=g) * 2) for k in range(2)}
    given_reliabilities(monkeypatch, reliabilities)
    ce = Recorder(monkeypatch, "reweighted_ce")
    mixup = Recorder(monkeypatch, "reliability_mixup")
    cdcl = Recorder(monkeypatch, "cdcl_loss")
    hrp_step(ctx, members, batch)
    cfg = ctx.cfg
    probs = [forwards[k][0][1][:N].softmax(dim=1) for k in range(2)]
    for k in range(2):
        peer = 1 - k
        targets, _ = refine_targets(
            probs[peer], batch.noisy_labels, cfg.tau_match, cfg.tau_conf, cfg.sharpen_temperature
        )
        T = total_reliability(*reliabilities[peer], cfg.t_min, cfg.t_max)
        ce_args, mix_args, cdcl_args = ce.calls[k][0], mixup.calls[k][0], cdcl.calls[k][0]
        torch.testing.assert_close(ce_args[1], targets)
        torch.testing.assert_close(ce_args[2], T)
        torch.testing.assert_close(mix_args[1], targets)
        torch.testing.assert_close(mix_args[2], T)
        assert torch.equal(cdcl_args[1], probs[peer].argmax(dim=1))
        torch.testing.assert_close(cdcl_args[2], normalize_beta(reliabilities[peer][1], cfg.delta))
        assert torch.equal(cdcl_args[3], probs[peer].max(dim=1).values >= cfg.tau_conf)
        assert not torch.allclose(T, total_reliability(*reliabilities[k], cfg.t_min, cfg.t_max))


def test_eq15_weighs_each_term_with_its_lambda_and_the_ramp(monkeypatch):
    """L = Σ_k L_CE + λ_cons L_cons + λ_prior L_prior + w(t) (L_RAM + λ_c L_CDCL), with w(t) < 1 inside the ramp
    (epoch 1.5 of warm-up 1 + ramp 2: w = 0.25) and every λ ≠ 1."""
    ctx, members, batch = make_step(
        warmup_epochs=1, ramp_epochs=2, lambda_cons=0.7, lambda_c=0.3, lambda_prior=0.4, tau_conf=0.0
    )
    batch.epoch = 1.5
    g = torch.Generator().manual_seed(3)
    given_reliabilities(
        monkeypatch, {k: (torch.rand(N, generator=g) * 2, torch.rand(N, generator=g) * 2) for k in range(2)}
    )
    member_terms = []
    member_loss = steps_module._hrp_member_loss
    monkeypatch.setattr(
        steps_module, "_hrp_member_loss", lambda *a, **k: member_terms.append(member_loss(*a, **k)) or member_terms[-1]
    )
    logs = hrp_step(ctx, members, batch)
    assert logs["ramp"].item() == pytest.approx(0.25)
    expected = sum(
        t["loss_ce"] + 0.7 * t["loss_cons"] + 0.4 * t["loss_prior"] + 0.25 * (t["loss_ram"] + 0.3 * t["loss_cdcl"])
        for t in member_terms
    )
    assert all(t["loss_cdcl"].item() > 0 and t["loss_ram"].item() > 0 for t in member_terms)
    torch.testing.assert_close(logs["loss"], expected.detach())


@pytest.mark.parametrize("meta_bn", ["eval", "batch", "eval_weak_stats"])
def test_meta_bn_reaches_the_meta_step_and_weak_stats_feeds_running_statistics_the_weak_views_only(
    monkeypatch, meta_bn
):
    """`meta_bn` reaches both networks' meta step; with eval_weak_stats the running statistics after the step are
    those one train-mode pass of the weak view gives (the updated weights, the statistics from before the step),
    with the others they also saw the strong view."""
    ctx, members, batch = make_step(meta_bn=meta_bn, strong_policy="randaugment")
    ctx.augment = BatchAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, strong_policy="randaugment")
    forwards = record_forwards(members)
    before = [{k: b.clone() for k, b in m.net.named_buffers()} for m in members]
    meta = Recorder(monkeypatch, "meta_reliabilities")
    hrp_step(ctx, members, batch)
    assert [kwargs["meta_bn"] for _, kwargs in meta.calls] == [meta_bn, meta_bn]
    for k, m in enumerate(members):
        weak_only = __import__("copy").deepcopy(m.net)
        weak_only.load_state_dict({**weak_only.state_dict(), **before[k]})
        with torch.no_grad():
            weak_only.train()(forwards[k][0][0][:N])
        mean, reference = m.net.block1[2].running_mean, weak_only.block1[2].running_mean
        assert torch.allclose(mean, reference) is (meta_bn == "eval_weak_stats")


@pytest.mark.parametrize(
    "terms, start, expect_mean",
    [(["ram"], 0.0, {"ram"}), (["ce", "cdcl"], 0.0, {"ce", "cdcl"}), (["ram", "ce", "cdcl"], 2.0, set())],
)
def test_reliability_mean_in_replaces_exactly_the_listed_terms_reliabilities_by_their_batch_mean(
    monkeypatch, terms, start, expect_mean
):
    """The paired intervention of issue 32: each listed term gets the batch mean of T (Eq. 13, RAM) or of β̂ (CDCL)
    from `reliability_mean_from` on (the batch is at epoch 1.0: a start at 2.0 changes nothing); the others keep
    the per-sample values."""
    ctx, members, batch = make_step(reliability_mean_in=terms, reliability_mean_from=start)
    alphas = [torch.linspace(0.1, 1.9, N), torch.linspace(1.5, 0.2, N)]
    betas = [torch.linspace(0.3, 1.4, N), torch.linspace(0.9, 0.1, N)]
    given_reliabilities(monkeypatch, list(zip(alphas, betas)))
    recorded = {name: Recorder(monkeypatch, name) for name in ("reweighted_ce", "reliability_mixup", "cdcl_loss")}
    hrp_step(ctx, members, batch)
    cfg = ctx.cfg
    for k in range(2):  # network k trains with its peer's T and β̂
        peer_T = total_reliability(alphas[1 - k], betas[1 - k], cfg.t_min, cfg.t_max)
        peer_beta_hat = normalize_beta(betas[1 - k], cfg.delta)
        seen = {
            "ce": recorded["reweighted_ce"].calls[k][0][2],
            "ram": recorded["reliability_mixup"].calls[k][0][2],
            "cdcl": recorded["cdcl_loss"].calls[k][0][2],
        }
        for term, value in seen.items():
            per_sample = peer_beta_hat if term == "cdcl" else peer_T
            expected = torch.full_like(per_sample, per_sample.mean().item()) if term in expect_mean else per_sample
            torch.testing.assert_close(value, expected, msg=f"net {k + 1}, {term}")


@pytest.mark.parametrize("schedule", ["multistep", "cosine", "constant"])
def test_the_lr_schedule_of_each_setting_per_epoch(schedule):
    """lr_schedule: multistep (×lr_gamma at each milestone), cosine from lr to lr_min over the run (L2B, ProMix,
    UNICON), constant (LongReMix's first stage); the trainer steps it once per epoch."""
    import math

    cfg = build_config(
        overrides={"lr": 0.1, "lr_schedule": schedule, "lr_min": 0.001, "epochs": 10, "lr_milestones": [4, 8]}
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = lr_scheduler(cfg, optimizer)
    seen = []
    for _ in range(cfg.epochs + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = {
        "multistep": [0.1 * 0.1 ** sum(e >= m for m in (4, 8)) for e in range(11)],
        "cosine": [0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(11)],
        "constant": [0.1] * 11,
    }[schedule]
    assert seen == pytest.approx(expected, rel=1e-9)
