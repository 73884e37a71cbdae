"""`hrp-ood plot RUN`: the method's diagnostics of one run folder as figures (the paper's Figs. 2 and 3).

From metrics.csv (one row per epoch) and signals/epoch_NNNN.npz (per-sample values of the saved epochs):

    reliability_auroc.png  AUROC of α, T and the per-sample loss for clean vs corrupted labels, and of β for
                           correct vs wrong pseudo-labels, per epoch; test and meta-set accuracy
    reliability_hist.png   α, β and T of clean vs corrupted samples at up to three saved epochs (Fig. 2a)
    cdcl_purity.png        share of CDCL positive pairs of one true class, plain and β̂-gated (Fig. 2b)
    ram_lambda.png         RAM's λ toward the first sample, clean–clean vs clean–noisy pairs (Fig. 2c)
    gate.png               mean GRG gate and mean T per epoch (Fig. 3b)
    class_hist.png         class shares of S's refined targets and of the test predictions (collapse)
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from hrp_ood.errors import UserError, one_line, shown
from hrp_ood.io import csv_number, read_metrics_rows
from hrp_ood.report.plots import _new_figure, _save_png
from hrp_ood.trainers.signals import PAIR_TYPES


def read_metrics(run_dir: Path) -> dict[str, np.ndarray]:
    """metrics.csv as columns of floats (empty cells → NaN)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise UserError(f"{path} not found; `hrp-ood plot` takes a run folder written by `hrp-ood train`")
    rows = read_metrics_rows(path)
    if not rows:
        raise UserError(f"{path} holds no epoch yet; plot after the first epoch")
    columns = {key for row in rows for key in row}
    return {key: np.array([csv_number(row, key) for row in rows]) for key in columns}


SIGNAL_FILE = re.compile(r"epoch_(\d+)\.npz")


def saved_epochs(run_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, file) of signals/epoch_NNNN.npz in epoch order; other files there are not the trainer's (ignored)."""
    matches = [(SIGNAL_FILE.fullmatch(p.name), p) for p in (run_dir / "signals").glob("epoch_*.npz")]
    return sorted((int(match[1]), p) for match, p in matches if match)


def load_signals(path: Path) -> dict[str, np.ndarray]:
    """One epoch's per-sample signals; a truncated or foreign file is one line naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(
            f"{shown(path)} is not a readable signals file ({one_line(str(err))}); delete or restore it, or plot "
            "a copy of the run without it"
        ) from None


def plot_run(run_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    metrics = read_metrics(run_dir)
    epochs = saved_epochs(run_dir)
    figures = {
        "reliability_auroc": _auroc_figure(metrics),
        "cdcl_purity": _series_figure(
            metrics,
            {"cdcl_purity": "positive pairs (pseudo-labels)", "cdcl_purity_gated": "β̂-gated (CDCL)"},
            "CDCL positive-pair purity",
            "share of one true class",
        ),
        "gate": _series_figure(
            metrics,
            {"gate": "mean GRG gate g", "T": "mean T = clip(α + β)"},
            "Global Reliability Gating",
            "mean over the epoch",
        ),
    }
    if epochs:
        loaded = [(epoch, load_signals(path)) for epoch, path in epochs]
        figures["reliability_hist"] = _reliability_histograms(loaded)
        figures["ram_lambda"] = _lambda_figure(*loaded[-1])
        figures["class_hist"] = _class_figure(loaded)
    return {name: _save_png(figure, out_dir / f"{name}.png") for name, figure in figures.items()}


def _auroc_figure(metrics: dict[str, np.ndarray]):
    figure, axes = _new_figure(1, 2, 4.2, 3.2)
    epoch = metrics["epoch"]
    for column, label in (
        ("alpha_auroc", "α (given label)"),
        ("T_auroc", "T = α + β"),
        ("loss_auroc", "−loss (small-loss signal)"),
        ("beta_pseudo_auroc", "β (pseudo-label correct)"),
        ("T_pseudo_auroc", "T (pseudo-label correct)"),
    ):
        if column in metrics and not np.isnan(metrics[column]).all():
            axes[0, 0].plot(epoch, metrics[column], marker=".", label=label)
    axes[0, 0].axhline(50, color="grey", linestyle=":", linewidth=0.8)
    axes[0, 0].set(title="Which samples do the signals find?", xlabel="epoch", ylabel="AUROC ×100")
    axes[0, 0].legend(fontsize=7)
    for column, label in (("acc_ensemble", "test (ensemble)"), ("meta_acc", "clean meta set")):
        if column in metrics:
            axes[0, 1].plot(epoch, metrics[column], marker=".", label=label)
    axes[0, 1].set(title="Accuracy", xlabel="epoch", ylabel="%")
    axes[0, 1].legend(fontsize=7)
    return figure


def _series_figure(metrics: dict[str, np.ndarray], columns: dict[str, str], title: str, ylabel: str):
    figure, axes = _new_figure(1, 1, 4.2, 3.2)
    ax = axes[0, 0]
    for column, label in columns.items():
        if column in metrics and not np.isnan(metrics[column]).all():
            ax.plot(metrics["epoch"], metrics[column], marker=".", label=label)
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not logged by this method", ha="center", va="center", transform=ax.transAxes)
    return figure


def _spread(epochs: list) -> list:
    """Up to three saved epochs: the first, the middle and the last."""
    picks = sorted({0, len(epochs) // 2, len(epochs) - 1})
    return [epochs[i] for i in picks]


def _reliability_histograms(loaded: list[tuple[int, dict[str, np.ndarray]]]):
    shown = _spread(loaded)
    figure, axes = _new_figure(len(shown), 3, 3.0, 2.3)
    for row, (epoch, data) in enumerate(shown):
        clean = data["is_clean"].astype(bool)
        for col, name in enumerate(("alpha", "beta", "T")):
            ax, values = axes[row, col], data[name]
            seen = ~np.isnan(values)
            if not seen.any():
                ax.text(
                    0.5,
                    0.5,
                    f"no {name} (warm-up or no meta step)",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=8,
                )
            else:
                bins = np.histogram_bin_edges(values[seen], bins=40)
                ax.hist(values[seen & clean], bins=bins, density=True, alpha=0.55, label="clean label")
                ax.hist(values[seen & ~clean], bins=bins, density=True, alpha=0.55, label="corrupted label")
                ax.legend(fontsize=7)
            ax.set_title(f"{name}, epoch {epoch}", fontsize=9)
    return figure


def _lambda_figure(epoch: int, data: dict[str, np.ndarray]):
    figure, axes = _new_figure(1, 1, 4.2, 3.2)
    ax = axes[0, 0]
    lam, kind = data["ram_lambda"], data["ram_pair_type"]
    if len(lam) == 0:
        ax.text(0.5, 0.5, "no RAM pairs logged", ha="center", va="center", transform=ax.transAxes)
    else:
        toward_clean = np.r_[
            lam[kind == PAIR_TYPES.index("clean-noisy")], 1 - lam[kind == PAIR_TYPES.index("noisy-clean")]
        ]
        bins = np.linspace(0, 1, 26)
        ax.hist(
            lam[kind == PAIR_TYPES.index("clean-clean")], bins=bins, density=True, alpha=0.55, label="clean–clean (λ)"
        )
        ax.hist(toward_clean, bins=bins, density=True, alpha=0.55, label="clean–noisy (weight on the clean one)")
        ax.legend(fontsize=7)
    ax.set(title=f"RAM mixing coefficient, epoch {epoch}", xlabel="λ", ylabel="density")
    return figure


def _class_figure(loaded: list[tuple[int, dict[str, np.ndarray]]]):
    figure, axes = _new_figure(1, 2, 4.2, 3.2)
    epochs = [epoch for epoch, _ in loaded]
    for ax, key, title in (
        (axes[0, 0], "counts_targets_S", "refined targets in S"),
        (axes[0, 1], "counts_test_predictions", "test predictions (ensemble)"),
    ):
        counts = np.stack([data[key] for _, data in loaded]).astype(float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(
            shares.T,
            aspect="auto",
            origin="lower",
            vmin=0,
            vmax=1,
            cmap="viridis",
            extent=(min(epochs) - 0.5, max(epochs) + 0.5, -0.5, shares.shape[1] - 0.5),
        )
        ax.set(title=f"class shares: {title}", xlabel="epoch", ylabel="class")
        figure.colorbar(image, ax=ax, fraction=0.046)
    return figure
