"""Per-epoch diagnostics of the method (the paper's Figs. 2–3): what α, β, T and the loss say about each sample.

Filled by the step functions, summarised by the trainer into metrics.csv, and saved per epoch as
`signals/epoch_NNNN.npz` for `hrp-ood plot`. The clean labels are used here for *measuring* only; no
training computation reads them.

Per sample (the epoch's last visit): ``alpha``, ``T`` (mean over the two networks), ``beta`` and
``pseudo_correct`` (net 1's β and whether its pseudo-label is the true class), ``loss`` (CE on the noisy
label, weak view, mean over the networks: the small-loss signal of co-teaching / DivideMix). Per class:
the hard refined targets of the high-confidence set S and the test predictions (collapse shows there
first). RAM's λ, oriented towards the first sample of each pair, with the pair's type
(clean–clean, clean–noisy, noisy–clean, noisy–noisy), capped at LAMBDA_SAMPLES per epoch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from hrp_ood import distributed
from hrp_ood.io import atomic_write

# selection: a comparison method's per-sample clean score (DivideMix's GMM probability, UNICON's 1 − JSD, ProMix's
# selection), higher = judged clean
PER_SAMPLE = ("alpha", "beta", "T", "loss", "pseudo_correct", "selection")
LAMBDA_SAMPLES = 4096
PAIR_TYPES = ("clean-clean", "clean-noisy", "noisy-clean", "noisy-noisy")


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AUROC ×100 of `scores` for the positive rows, over the rows with a score; NaN if a class is missing."""
    seen = ~torch.isnan(scores)
    labels = positive[seen].cpu().numpy().astype(bool)
    if labels.all() or not labels.any():
        return math.nan
    return 100.0 * roc_auc_score(labels, scores[seen].double().cpu().numpy())


def batch_auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AUROC ×100 of one batch's `scores` for its positive rows, ties counting one half (Mann–Whitney), as a
    tensor on the scores' device: no host synchronisation, so a step can call it. NaN when a class is missing."""
    scores = scores.float()
    pairs = (positive[:, None] & ~positive[None, :]).float()  # (positive row, negative column)
    wins = (scores[:, None] > scores[None, :]).float() + 0.5 * (scores[:, None] == scores[None, :]).float()
    return 100.0 * (wins * pairs).sum() / pairs.sum()


def class_share_max(counts: torch.Tensor) -> float:
    """Share of the most frequent class (1/C balanced, 1.0 = everything in one class); NaN when empty."""
    total = counts.sum().item()
    return counts.max().item() / total if total > 0 else math.nan


class EpochSignals:
    def __init__(
        self, num_samples: int, num_classes: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        self.values = {
            name: torch.full((num_samples,), float("nan"), device=device, dtype=dtype) for name in PER_SAMPLE
        }
        self.class_counts = {name: torch.zeros(num_classes, device=device) for name in ("targets_S",)}
        self.lambdas: list[torch.Tensor] = []  # rows (λ, pair type)

    def record(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        self.values[name][index] = values.detach().to(self.values[name].dtype)

    def count_classes(self, name: str, labels: torch.Tensor) -> None:
        self.class_counts[name] += torch.bincount(labels, minlength=self.class_counts[name].numel()).to(
            self.class_counts[name].dtype
        )

    def add_lambdas(self, lam: torch.Tensor, first_clean: torch.Tensor, second_clean: torch.Tensor) -> None:
        kept = sum(len(rows) for rows in self.lambdas)
        if kept >= LAMBDA_SAMPLES:
            return
        pair_type = 2 * (~first_clean).long() + (~second_clean).long()  # index into PAIR_TYPES
        self.lambdas.append(torch.stack([lam.detach().float(), pair_type.float()], dim=1)[: LAMBDA_SAMPLES - kept])

    def merged(self) -> "EpochSignals":
        """Every rank's per-sample values and class counts combined (identity in one process)."""
        if distributed.world_size() == 1:
            return self
        out = EpochSignals.__new__(EpochSignals)
        out.values = {k: _merge_seen(v) for k, v in self.values.items()}
        out.class_counts = {k: distributed.global_sum(v) for k, v in self.class_counts.items()}
        out.lambdas = self.lambdas  # rank 0's sample
        return out

    def summary(self, is_clean: torch.Tensor) -> dict[str, float]:
        """metrics.csv columns: the AUROCs of each signal and the collapse indicator of the targets."""
        v = self.values
        return {
            "alpha_auroc": auroc(v["alpha"], is_clean),
            "T_auroc": auroc(v["T"], is_clean),
            "loss_auroc": auroc(-v["loss"], is_clean),
            "selection_auroc": auroc(v["selection"], is_clean),
            "beta_pseudo_auroc": auroc(v["beta"], v["pseudo_correct"] > 0.5),
            # T for a correct pseudo-label: RAM mixes toward, and GRG weights up, the samples T ranks first
            "T_pseudo_auroc": auroc(v["T"], v["pseudo_correct"] > 0.5),
            "pseudo_acc": 100.0 * torch.nanmean(v["pseudo_correct"]).item(),
            "targets_S_class_max": class_share_max(self.class_counts["targets_S"]),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        merged = self.merged()
        state = {f"value_{k}": t.cpu() for k, t in merged.values.items()}
        state.update({f"count_{k}": t.cpu() for k, t in merged.class_counts.items()})
        state["lambdas"] = self._lambda_rows().cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], keep: bool = True) -> None:
        """Restore a mid-epoch state; `keep` False (ranks other than 0) restarts the sums at zero and NaN."""
        for k, t in self.values.items():
            if f"value_{k}" in state and keep:
                t.copy_(state[f"value_{k}"])
        for k, t in self.class_counts.items():
            if f"count_{k}" in state and keep:
                t.copy_(state[f"count_{k}"])
        rows = state.get("lambdas")
        self.lambdas = [rows.to(self.values["alpha"].device)] if rows is not None and len(rows) and keep else []

    def _lambda_rows(self) -> torch.Tensor:
        return torch.cat(self.lambdas) if self.lambdas else torch.zeros(0, 2)

    def save(self, path: Path, is_clean: torch.Tensor, test_prediction_counts: torch.Tensor) -> None:
        """The epoch's per-sample signals as a compressed .npz (what `hrp-ood plot` draws). Rank 0 alone
        writes: call it on the `merged()` signals, which every rank must compute together."""
        arrays = {k: t.cpu().numpy() for k, t in self.values.items()}
        arrays.update({f"counts_{k}": t.cpu().numpy() for k, t in self.class_counts.items()})
        arrays["counts_test_predictions"] = test_prediction_counts.cpu().numpy()
        rows = self._lambda_rows().cpu().numpy()
        arrays["ram_lambda"], arrays["ram_pair_type"] = rows[:, 0], rows[:, 1].astype(np.int8)
        arrays["is_clean"] = is_clean.cpu().numpy()

        def write(f) -> None:
            np.savez_compressed(f, **arrays)

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)


def _merge_seen(values: torch.Tensor) -> torch.Tensor:
    """Per-sample values each rank filled for its own samples (NaN elsewhere), combined over ranks."""
    if distributed.world_size() == 1:
        return values
    seen = ~torch.isnan(values)
    total = distributed.global_sum(torch.where(seen, values, torch.zeros_like(values)))
    count = distributed.global_sum(seen.to(values.dtype))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(values, float("nan")))
