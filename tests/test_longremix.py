"""LongReMix (hrp_ood/trainers/longremix.py) against filipe-research/LongReMix @ 567c89b: the high-confidence set is
an AND of the last hcs_epochs GMM masks, stage 1 trains on the peer's HCS, stage 2 keeps network 1's largest HCS of
the search window, starts from fresh networks and optimisers, forces prob 1 on the HCS and runs (|L|+|U|)//B + 1
steps per network; an end-to-end run across the stage switch, with resume."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_train_args
from hrp_ood.train.trainer import build_members

import hrp_ood.trainers.longremix as lrm
from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.config import build_config
from hrp_ood.models import create_model
from hrp_ood.trainers.base import StepContext

N = 40


def context(**overrides) -> StepContext:
    values = {"method": "longremix", "model": "small_cnn", "device": "cpu", "batch_size": 4, "warmup_epochs": 1}
    values.update(longremix_stage1_epochs=6, hcs_epochs=3, hcs_search_epochs=2)
    cfg = build_config(overrides={**values, **overrides})
    return StepContext(cfg, None, torch.zeros(0), torch.zeros(0), autocast_device=None)


def data(n=N):
    return SimpleNamespace(noisy_labels=torch.zeros(n, dtype=torch.long), num_classes=3)


def given_probabilities(monkeypatch, sequence):
    """clean_probabilities returns the next pair of (N,) probabilities of `sequence` at each call."""
    calls = iter(sequence)
    monkeypatch.setattr(lrm, "clean_probabilities", lambda ctx, members, data, epoch: next(calls))


def test_high_confidence_set_is_labeled_in_each_of_the_last_hcs_epochs():
    ctx = context()
    rng = np.random.default_rng(0)
    masks = rng.random((6, 2, N)) < 0.8
    for e in range(6):
        hcs = lrm.remember_labeled(ctx, torch.from_numpy(masks[e]))
        expected = masks[max(0, e - 2) : e + 1].all(axis=0)  # hcs_epochs = 3
        np.testing.assert_array_equal(hcs.numpy(), expected)
    assert ctx.method_state["hcs_masks"].shape == (2, 3, N)


def test_the_largest_hcs_of_network_1_in_the_search_window_is_kept_ties_the_latest():
    ctx = context()  # stage 1 of 6 epochs, window 2: epochs 4 and 5
    sizes = {0: 30, 3: 25, 4: 10, 5: 10}
    for epoch, size in sizes.items():
        hcs = torch.zeros(N, dtype=torch.bool)
        hcs[N - size if epoch == 5 else 0 : (N if epoch == 5 else size)] = True
        lrm.keep_largest(ctx, hcs, epoch)
    best = ctx.method_state["hcs_best"]
    assert int(best.sum()) == 10 and best[-10:].all(), "epochs before the window are ignored; a tie takes the latest"


def test_stage1_trains_each_network_on_its_peers_hcs_with_the_peers_probability(monkeypatch):
    ctx = context(warmup_epochs=0, hcs_epochs=2)
    g = torch.Generator().manual_seed(0)
    probs = [[torch.rand(N, generator=g) for _ in range(2)] for _ in range(2)]
    given_probabilities(monkeypatch, probs)
    lrm.stage1_plan(ctx, [None, None], data(), epoch=0)
    plan = lrm.stage1_plan(ctx, [None, None], data(), epoch=1)
    for k in range(2):
        peer = 1 - k
        hcs = (probs[0][peer] > 0.5) & (probs[1][peer] > 0.5)
        rows = plan.index[plan.extras["net"] == k]
        assert set(rows.flatten().tolist()) == set(hcs.nonzero().flatten().tolist())
        assert torch.equal(plan.extras["weight"][plan.extras["net"] == k], probs[1][peer][rows])


def test_stage1_warmup_epochs_still_record_masks(monkeypatch):
    ctx = context(warmup_epochs=2)
    given_probabilities(monkeypatch, [[torch.ones(N), torch.ones(N)]])
    plan = lrm.epoch_plan(ctx, [None, None], data(), epoch=0)
    assert "unlabeled" not in plan.extras and ctx.method_state["hcs_masks"].shape == (2, 1, N)


def test_stage2_starts_from_fresh_seeded_networks_and_empty_optimisers():
    ctx = context()
    torch.manual_seed(0)
    members = build_members(ctx.cfg, 3, torch.device("cpu"))
    x = torch.randn(4, 3, 32, 32)
    members[0].net(x).sum().backward()
    members[0].optimizer.step()
    ctx.method_state = {"loss_history": torch.zeros(2, 1, N), "hcs_masks": torch.ones(2, 1, N, dtype=torch.bool)}
    ctx.method_state["hcs_best"] = torch.ones(N, dtype=torch.bool)
    trained = {k: v.clone() for k, v in members[0].net.state_dict().items()}
    lrm.start_stage2(ctx, members, num_classes=3)
    assert not all(torch.equal(trained[k], v) for k, v in members[0].net.state_dict().items()), "new weights"
    assert all(len(m.optimizer.state) == 0 for m in members)
    assert set(ctx.method_state) == {"hcs_best"}
    first = [{k: v.clone() for k, v in m.net.state_dict().items()} for m in members]
    torch.manual_seed(123)  # the global stream does not matter: the generator is seeded from cfg.seed
    lrm.start_stage2(ctx, members, num_classes=3)
    for before, m in zip(first, members):
        assert all(torch.equal(before[k], v) for k, v in m.net.state_dict().items())
    key = next(k for k, v in first[0].items() if v.is_floating_point())
    assert not torch.equal(first[0][key], first[1][key]), "the two networks start differently"
    fresh = create_model("small_cnn", num_classes=3)
    assert fresh.state_dict().keys() == first[0].keys()


def test_stage2_forces_prob_1_on_the_hcs_and_takes_l_plus_u_over_b_plus_1_steps(monkeypatch):
    ctx = context(warmup_epochs=0, batch_size=4)
    hcs = torch.arange(N) < 6
    ctx.method_state["hcs_best"] = hcs
    probs = [torch.full((N,), 0.1), torch.linspace(0, 1, N)]
    given_probabilities(monkeypatch, [probs])
    plan = lrm.stage2_plan(ctx, [None, None], data(), epoch=3)
    steps = N // 4 + 1
    assert plan.steps == 2 * steps
    for k in range(2):
        forced = torch.where(hcs, 1.0, probs[1 - k])
        rows = plan.index[plan.extras["net"] == k]
        assert set(rows.flatten().tolist()) == set((forced > 0.5).nonzero().flatten().tolist())
        assert torch.equal(plan.extras["weight"][plan.extras["net"] == k], forced[rows])
    times = plan.extras["epoch_time"]
    assert times.min() >= 3 and times.max() < 4, "the λu ramp counts from stage 2's start"


def test_epoch_plan_switches_stage_once(monkeypatch):
    ctx = context()
    calls = []
    monkeypatch.setattr(lrm, "start_stage2", lambda ctx, members, n: calls.append(n))
    monkeypatch.setattr(lrm, "stage2_plan", lambda ctx, members, data, epoch: epoch)
    assert [lrm.epoch_plan(ctx, [None, None], data(), e) for e in (6, 7)] == [0, 1]
    assert calls == [3]


def test_configs_run_both_stages_with_the_reference_schedules():
    for dataset, warmup in (("cifar10", 10), ("cifar100", 30)):
        cfg = build_config(f"configs/{dataset}_longremix.yaml")
        assert (cfg.epochs, cfg.longremix_stage1_epochs, cfg.lr, cfg.lr_milestones) == (600, 300, 0.02, [450])
        assert (cfg.hcs_epochs, cfg.hcs_search_epochs, cfg.batch_size, cfg.warmup_epochs) == (5, 150, 64, warmup)


@pytest.mark.slow
def test_longremix_trains_across_the_stage_switch_and_resumes(make_cifar_root, tmp_path):
    root = make_cifar_root(200, 60)
    args = ["train", "--data-root", str(root), "--method", "longremix", "--out-dir", str(tmp_path), "--name", "lr"]
    args += tiny_train_args(hrp=True)
    args += ["--set", "longremix_stage1_epochs=2", "--set", "hcs_epochs=2", "--set", "hcs_search_epochs=1"]
    assert main([*args, "--epochs", "3"]) == 0
    state = load_checkpoint(tmp_path / "lr" / "last.pt")
    assert len(state["nets"]) == 2 and state["method_state"]["hcs_best"].dtype == torch.bool
    resume = ["train", "--out-dir", str(tmp_path), "--name", "lr", "--resume", "--epochs", "4", "--no-progress"]
    assert main(resume) == 0
    assert load_checkpoint(tmp_path / "lr" / "last.pt")["epoch"] == 4
