"""The method's diagnostics (trainers/signals.py and the step's measurements) against brute-force references, and
the per-sample reliability memory against a hand-written EMA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from hrp_ood.method import ReliabilityMemory, meta_reliabilities, reliabilities_from_signed
from hrp_ood.trainers.hrp import _cdcl_purity, _ram_diagnostics
from hrp_ood.trainers.signals import EpochSignals, auroc, batch_auroc, class_share_max


def test_batch_auroc_matches_sklearn_with_ties_and_is_nan_for_one_class():
    g = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 4, (40,), generator=g).float().clamp_min(1) - 1  # ties, a third at 0 like clamped α
    positive = torch.rand(40, generator=g) < 0.4
    expected = 100 * roc_auc_score(positive.numpy(), scores.numpy())
    assert batch_auroc(scores, positive).item() == pytest.approx(expected)
    assert math.isnan(batch_auroc(scores, torch.ones(40, dtype=torch.bool)).item())


def test_auroc_matches_sklearn_and_skips_unseen_rows():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, generator=g)
    positive = torch.rand(50, generator=g) > 0.4
    scores[::7] = float("nan")  # samples not visited this epoch
    seen = ~torch.isnan(scores)
    expected = 100 * roc_auc_score(positive[seen].numpy(), scores[seen].numpy())
    assert auroc(scores, positive) == pytest.approx(expected)
    assert math.isnan(auroc(scores, torch.ones(50, dtype=torch.bool)))  # one class only


def test_class_share_max():
    assert class_share_max(torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(0.5)
    assert class_share_max(torch.tensor([0.0, 5.0])) == 1.0
    assert math.isnan(class_share_max(torch.zeros(3)))


def test_cdcl_purity_against_pair_loops():
    g = torch.Generator().manual_seed(1)
    n = 9
    pseudo = torch.randint(0, 3, (n,), generator=g)
    true = torch.randint(0, 3, (n,), generator=g)
    beta_hat = torch.rand(n, generator=g)
    confident = torch.rand(n, generator=g) > 0.3
    got = _cdcl_purity(pseudo, beta_hat, confident, true)
    rows = [(pseudo[i % n], true[i % n], beta_hat[i % n], confident[i % n]) for i in range(2 * n)]  # two views
    pairs = pure = gated = gated_pure = 0.0
    for a in range(2 * n):
        for b in range(2 * n):
            if a % n == b % n or rows[a][0] != rows[b][0] or not (rows[a][3] and rows[b][3]):  # other samples only
                continue
            w = float(rows[a][2] * rows[b][2])
            same = float(rows[a][1] == rows[b][1])
            pairs, pure, gated, gated_pure = pairs + 1, pure + same, gated + w, gated_pure + w * same
    assert got["cdcl_purity"].item() == pytest.approx(pure / pairs)
    assert got["cdcl_purity_gated"].item() == pytest.approx(gated_pure / gated)


def test_cdcl_purity_without_positive_pairs_is_nan():
    got = _cdcl_purity(torch.arange(4), torch.ones(4), torch.zeros(4, dtype=torch.bool), torch.arange(4))
    assert torch.isnan(got["cdcl_purity"]) and torch.isnan(got["cdcl_purity_gated"])


class _Batch:
    def __init__(self, noisy, clean):
        self.noisy_labels, self.clean_labels = noisy, clean


class _Ctx:
    def __init__(self, signals):
        self.signals = signals


def test_ram_diagnostics_by_pair_type():
    noisy = torch.tensor([0, 1, 2, 3])
    clean = torch.tensor([0, 1, 9, 9])  # samples 0, 1 clean; 2, 3 corrupted
    perm = torch.tensor(
        [1, 2, 3, 0]
    )  # pairs (0,1) clean-clean, (1,2) clean-noisy, (2,3) noisy-noisy, (3,0) noisy-clean
    lam = torch.tensor([0.9, 0.7, 0.5, 0.2])
    signals = EpochSignals(4, 10)
    got = _ram_diagnostics(_Ctx(signals), lam, perm, _Batch(noisy, clean))
    # weight on the clean side: pair (1,2) gives λ = 0.7 to sample 1 (clean); pair (3,0) gives 1 − 0.2 to sample 0
    assert got["ram_lambda_clean_noisy"].item() == pytest.approx((0.7 + 0.8) / 2)
    assert got["ram_lambda_clean_clean"].item() == pytest.approx(abs(2 * 0.9 - 1))
    rows = torch.cat(signals.lambdas)
    assert rows[:, 1].tolist() == [0, 1, 3, 2]  # clean-clean, clean-noisy, noisy-noisy, noisy-clean


def test_epoch_signals_summary_and_saved_file(tmp_path):
    signals = EpochSignals(6, 3)
    is_clean = torch.tensor([True, True, True, False, False, False])
    index = torch.arange(6)
    signals.record("alpha", index, torch.tensor([3.0, 2.0, 1.5, 0.1, 0.2, 1.0]))
    signals.record("T", index, torch.tensor([3.0, 2.0, 1.5, 0.1, 0.2, 1.0]))
    signals.record("loss", index, torch.tensor([0.1, 0.2, 3.0, 2.0, 2.5, 0.3]))
    signals.record("beta", index, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    signals.record("pseudo_correct", index, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    signals.count_classes("targets_S", torch.tensor([0, 0, 0, 1]))
    row = signals.summary(is_clean)
    assert row["alpha_auroc"] == pytest.approx(100.0)
    assert row["loss_auroc"] == pytest.approx(100 * roc_auc_score(is_clean.numpy(), -signals.values["loss"].numpy()))
    assert row["beta_pseudo_auroc"] == pytest.approx(100 * roc_auc_score([1, 0, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0]))
    assert row["T_pseudo_auroc"] == pytest.approx(100 * 7 / 8)  # T 3.0 and 1.5 are correct: 1.5 < 2.0 is the one miss
    assert row["targets_S_class_max"] == pytest.approx(0.75)
    signals.save(tmp_path / "signals" / "epoch_0001.npz", is_clean, torch.tensor([5.0, 1.0, 0.0]))
    saved = np.load(tmp_path / "signals" / "epoch_0001.npz")
    assert saved["alpha"].tolist() == pytest.approx([3.0, 2.0, 1.5, 0.1, 0.2, 1.0])
    assert saved["is_clean"].tolist() == is_clean.tolist()
    assert saved["counts_test_predictions"].tolist() == [5.0, 1.0, 0.0]


def _signed(values):
    return reliabilities_from_signed(torch.tensor(values[0]), torch.tensor(values[1]))


def test_memory_with_momentum_zero_is_one_batch():
    memory = ReliabilityMemory(5, momentum=0.0)
    rel = _signed(([0.5, -1.0, 2.0], [1.0, 0.0, -3.0]))
    assert memory.update(torch.tensor([0, 2, 4]), rel, torch.tensor([1, 1, 1]), "separate", 1e-8) is rel


def test_memory_is_an_ema_of_scale_free_meta_gradients():
    m, delta = 0.75, 1e-8
    memory = ReliabilityMemory(4, momentum=m)
    index = torch.tensor([0, 1, 2])
    first = ([1.0, -2.0, 3.0], [2.0, 2.0, -4.0])
    second = ([4.0, 4.0, -8.0], [1.0, -1.0, 2.0])
    memory.update(index, _signed(first), torch.tensor([0, 1, 2]), "separate", delta)
    # the second visit: sample 2's pseudo-label changed (β restarts), the others keep theirs
    got = memory.update(index, _signed(second), torch.tensor([0, 1, 0]), "separate", delta)

    def scale_free(v):
        v = np.array(v)
        return v / (np.abs(v).mean() + delta)

    alpha = m * scale_free(first[0]) + (1 - m) * scale_free(second[0])
    beta = m * scale_free(first[1]) + (1 - m) * scale_free(second[1])
    beta[2] = scale_free(second[1])[2]
    expected = reliabilities_from_signed(
        torch.tensor(alpha, dtype=torch.float32), torch.tensor(beta, dtype=torch.float32)
    )
    assert torch.allclose(got.alpha, expected.alpha, atol=1e-6)
    assert torch.allclose(got.beta, expected.beta, atol=1e-6)
    assert torch.isnan(memory.alpha[3])  # never visited
    # clamp + Eq. 5 act on the averages: mean 1 over the positive ones
    assert got.alpha.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_memory_state_round_trip():
    memory = ReliabilityMemory(3, momentum=0.5)
    memory.update(torch.tensor([0, 1]), _signed(([1.0, -1.0], [0.5, 2.0])), torch.tensor([2, 1]), "separate", 1e-8)
    other = ReliabilityMemory(3, momentum=0.5)
    other.load_state_dict(memory.state_dict())
    for name in ("alpha", "beta", "pseudo"):
        assert torch.allclose(getattr(other, name).double(), getattr(memory, name).double(), equal_nan=True)


def test_signed_reliabilities_are_the_unclamped_meta_gradients():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, meta_x = torch.randn(6, 3, 2, 2), torch.randn(4, 3, 2, 2)
    y, meta_y, pseudo = torch.randint(0, 3, (6,)), torch.randint(0, 3, (4,)), torch.randint(0, 3, (6,))
    rel = meta_reliabilities(net, x, y, pseudo, meta_x, meta_y, lr=0.1)
    assert (rel.alpha_signed < 0).any() and torch.equal(rel.alpha_raw, rel.alpha_signed.clamp_min(0))
    assert torch.equal(rel.beta_raw, rel.beta_signed.clamp_min(0))
