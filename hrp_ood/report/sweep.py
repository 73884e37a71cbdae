"""The grid-wide part of a sweep's report: test accuracy over seeds (from every run's metrics.csv), the training
summary and the noise curves (OOD metrics and test accuracy against the noise rate, one line per method, ± std
over seeds).

Written beside `hrp-ood report`'s OOD tables in `<out>/report/`: accuracy.md, accuracy.tex (booktabs, as
report.tex) and accuracy.csv (a row per run, every summary column), summary.md (the summary columns, mean ± std
over seeds, a row per grid point), and plots/noise_curves.png and plots/accuracy_vs_noise.png when the grid
varies `noise`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hrp_ood.io import atomic_write_text, csv_number
from hrp_ood.report.evaluations import METRIC_LABELS, STD_DDOF, noise_sort_key, ordered_values
from hrp_ood.report.plots import _new_figure, _save_png
from hrp_ood.report.tables import format_mean_std, to_latex, to_markdown

ACCURACY = "test_acc"
# summary column → (metrics.csv column, how it is taken over the epochs): the ensemble's test accuracy at the last
# epoch, its peak, at the epoch best.pt holds (the most accurate on the clean meta set), and the reliability
# AUROCs (×100) averaged over the epochs after the warm-up: α, T = α + β, and the per-sample CE loss, for telling
# clean given labels from corrupted ones, β and T for correct pseudo-labels; "_batch": within each batch, then averaged;
# and two mechanism instruments averaged the same way: the share of the mix RAM gives the clean sample of a
# clean–noisy pair (0.5 = no arbitration) and the share of CDCL's β̂-gated positive pairs whose true classes agree (%)
SUMMARY_COLUMNS = {
    ACCURACY: ("acc_ensemble", "last"),
    "test_acc_peak": ("acc_ensemble", "max"),
    "test_acc_meta_selected": ("acc_ensemble", "meta_selected"),
    "alpha_auroc": ("alpha_auroc", "after_warmup"),
    "alpha_auroc_batch": ("alpha_auroc_batch", "after_warmup"),
    "beta_auroc": ("beta_pseudo_auroc", "after_warmup"),
    "beta_auroc_batch": ("beta_auroc_batch", "after_warmup"),
    "loss_auroc": ("loss_auroc", "after_warmup"),
    "T_auroc": ("T_auroc", "after_warmup"),
    "T_pseudo_auroc": ("T_pseudo_auroc", "after_warmup"),
    "ram_lambda_clean_noisy": ("ram_lambda_clean_noisy", "after_warmup"),
    "cdcl_purity_gated": ("cdcl_purity_gated", "after_warmup"),
}
PERCENT_COLUMNS = {"cdcl_purity_gated"}  # logged as a fraction
# the worst seed's last-epoch accuracy (a row's floor: a bimodal method shows here, not in mean ± std)
ACCURACY_MIN = "test_acc_min"
SUMMARY_DECIMALS = {"ram_lambda_clean_noisy": 2}


def run_summary(rows: list[dict[str, str]], warmup_epochs: int, meta_held_out: bool = True) -> dict[str, float]:
    """SUMMARY_COLUMNS of one run from its metrics.csv rows (NaN where a column is absent, e.g. α for CE).
    Without a held-out meta set (ce_meta, or meta_size 0) best.pt is the last epoch, and so is the run's selection
    when no epoch has a meta accuracy (meta_acc empty)."""

    def values(column: str, epochs: list[dict[str, str]]) -> np.ndarray:
        return np.array([csv_number(r, column) for r in epochs], dtype=float)

    meta = values("meta_acc", rows)
    selected = int(np.nanargmax(meta)) if meta_held_out and np.isfinite(meta).any() else len(rows) - 1
    after = [r for r in rows if int(r["epoch"]) > warmup_epochs] or rows
    summary = {}
    for name, (column, how) in SUMMARY_COLUMNS.items():
        if how == "after_warmup":
            taken = values(column, after)
            summary[name] = float(np.nanmean(taken)) if np.isfinite(taken).any() else np.nan
            if name in PERCENT_COLUMNS:
                summary[name] *= 100
        else:
            taken = values(column, rows)
            summary[name] = {"last": taken[-1], "max": np.nanmax(taken), "meta_selected": taken[selected]}[how]
    return summary


def accuracy_frame(
    runs: dict[str, dict[str, Any]], histories: dict[str, list[dict[str, str]]], configs: dict[str, Any]
) -> pd.DataFrame:
    """A row per run of `histories` (run → its metrics.csv rows): its grid values (as text) and SUMMARY_COLUMNS
    (`configs`: run → its TrainConfig, for the warm-up and whether the meta set is held out)."""
    rows = []
    for name, history in histories.items():
        if not history:
            continue
        from hrp_ood.train.trainer import selects_on_meta_set

        spec = configs[name].spec
        summary = run_summary(history, configs[name].warmup_epochs, selects_on_meta_set(configs[name]))
        if not spec.meta:  # α ≡ β ≡ 1 without a meta step: their AUROC says nothing
            summary.update({key: np.nan for key in summary if key.startswith(("alpha", "beta", "T_"))})
        rows.append({**{key: str(value) for key, value in runs[name].items()}, **summary})
    return pd.DataFrame(rows)


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every SUMMARY_COLUMN as mean ± std over seeds, and the worst seed's accuracy (ACCURACY_MIN), a row per grid
    point without seed (the display text is table["cell"], to_markdown's input)."""
    keys = [key for key in frame.columns if key not in SUMMARY_COLUMNS and key != "seed"] or ["all"]
    frame = frame.assign(all="all") if keys == ["all"] else frame
    columns = [c for c in SUMMARY_COLUMNS if c in frame and frame[c].notna().any()]
    grouped = frame.groupby(keys, sort=False)

    def cell(column: str, values: pd.Series) -> str:
        std = values.std(ddof=STD_DDOF) if values.count() > 1 else np.nan
        return format_mean_std(values.mean(), std, SUMMARY_DECIMALS.get(column, 1))

    cells = pd.DataFrame({c: [cell(c, v) for _, v in grouped[c]] for c in columns}, index=grouped.size().index)
    if ACCURACY in columns:
        cells.insert(1, ACCURACY_MIN, [format_mean_std(v.min(), np.nan) for _, v in grouped[ACCURACY]])
    cells["seeds"] = grouped.size().astype(str).to_numpy()
    if not isinstance(cells.index, pd.MultiIndex):
        cells.index = pd.MultiIndex.from_arrays([cells.index])
    return pd.concat({"cell": cells}, axis=1)


def accuracy_table(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Test accuracy, mean ± std over seeds: a row per grid point without seed (and `by`), a column per value of
    `by` when the grid varies it. The display text is table["cell"] (to_markdown / to_latex's input)."""
    keys = [key for key in frame.columns if key not in SUMMARY_COLUMNS and key != "seed"]
    rows = [key for key in keys if key != by] or ["all"]
    frame = frame.assign(all="all") if rows == ["all"] else frame
    stats = frame.groupby(rows + [by] if by in keys else rows, sort=False)[ACCURACY].agg(
        mean="mean", std=lambda v: v.std(ddof=STD_DDOF), n_seeds="count"
    )
    stats["cell"] = [format_mean_std(m, s, 2) for m, s in zip(stats["mean"], stats["std"])]
    if by not in keys:
        table = pd.concat({"cell": stats[["cell"]].rename(columns={"cell": "test acc"})}, axis=1)
    else:
        columns = pd.MultiIndex.from_product([["mean", "std", "n_seeds", "cell"], ordered_values(frame[by], by)])
        table = stats.unstack(by).reindex(columns=columns)
        table["cell"] = table["cell"].fillna("–")
    if not isinstance(table.index, pd.MultiIndex):  # to_markdown reads every row key as a tuple
        table.index = pd.MultiIndex.from_arrays([table.index])
    return table


def write_accuracy_table(frame: pd.DataFrame, by: str, out_dir: Path) -> dict[str, Path]:
    table = accuracy_table(frame, by)
    written = {
        "accuracy_csv": out_dir / "accuracy.csv",
        "accuracy_markdown": out_dir / "accuracy.md",
        "accuracy_latex": out_dir / "accuracy.tex",
    }
    atomic_write_text(written["accuracy_csv"], frame.to_csv(index=False))
    atomic_write_text(written["accuracy_markdown"], to_markdown(table, ACCURACY_CAPTION))
    atomic_write_text(written["accuracy_latex"], to_latex(table, ACCURACY_CAPTION))
    written["summary_markdown"] = out_dir / "summary.md"
    atomic_write_text(written["summary_markdown"], to_markdown(summary_table(frame), SUMMARY_CAPTION))
    return written


ACCURACY_CAPTION = "Ensemble test accuracy (%) at the last epoch, mean ± std over seeds"
SUMMARY_CAPTION = (
    "Training summary, mean ± std over seeds: ensemble test accuracy (%) at the last epoch (and its "
    "minimum over seeds), at its peak and at the epoch the clean meta set selects (best.pt); AUROC "
    "(×100) over the epochs after the warm-up of α, T and the per-sample loss for clean given labels, "
    "of β for correct pseudo-labels, pooled over the epoch and within each batch (_batch); over the "
    "same epochs, RAM's weight on the clean sample of a clean–noisy pair and CDCL's gated pair purity (%)"
)


def noise_rate(name: str) -> float:
    return noise_sort_key(name)[2]


def _curve(ax: Any, frame: pd.DataFrame, value: str) -> None:
    """One line per method: mean of `value` over seeds against the noise rate, with a ± std band."""
    groups = frame.groupby("method", sort=False) if "method" in frame.columns else [("all", frame)]
    for method, runs in groups:
        stats = runs.assign(rate=runs["noise"].map(noise_rate)).groupby("rate")[value].agg(["mean", "std"])
        std = stats["std"].fillna(0.0)
        (line,) = ax.plot(stats.index, stats["mean"], marker="o", label=method)
        ax.fill_between(stats.index, stats["mean"] - std, stats["mean"] + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("noise rate (%)", fontsize=8)
    ax.legend(fontsize=7)


def noise_curve_figures(
    evaluations: pd.DataFrame, accuracy: pd.DataFrame, metrics: tuple[str, ...], ood: str, out_dir: Path
) -> dict[str, Path]:
    """plots/noise_curves.png (a row per postprocessor, a column per metric, on the `ood` column of the OOD
    sets of `evaluations`, load_evaluations' table) and plots/accuracy_vs_noise.png."""
    df = evaluations[evaluations["ood"] == ood]
    postprocessors = ordered_values(df["postprocessor"], "postprocessor")
    figure, axes = _new_figure(len(postprocessors), len(metrics), 3.4, 2.8)
    for i, pp in enumerate(postprocessors):
        for j, metric in enumerate(metrics):
            _curve(axes[i, j], df[df["postprocessor"] == pp], metric)
            axes[i, j].set_title(f"{pp} · {METRIC_LABELS[metric]} ({ood} over OOD sets)", fontsize=9)
    figure.suptitle("OOD detection against label noise (mean ± std over seeds)", fontsize=10)
    written = {"noise_curves": _save_png(figure, out_dir / "plots" / "noise_curves.png")}
    figure, axes = _new_figure(1, 1, 4.8, 3.0)
    _curve(axes[0, 0], accuracy, ACCURACY)
    axes[0, 0].set_ylabel("ensemble test accuracy (%)", fontsize=8)
    figure.suptitle("Test accuracy against label noise (mean ± std over seeds)", fontsize=10)
    written["accuracy_vs_noise"] = _save_png(figure, out_dir / "plots" / "accuracy_vs_noise.png")
    return written


def has_noise_curves(frame: pd.DataFrame) -> bool:
    return (
        "noise" in frame.columns
        and frame["noise"].nunique() > 1
        and bool(np.isfinite(frame["noise"].map(noise_rate)).all())
    )
