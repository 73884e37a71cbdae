"""The grid-wide part of a sweep's report: test accuracy over seeds (from every run's metrics.csv) and the
noise curves (OOD metrics and test accuracy against the noise rate, one line per method, ± std over seeds).

Written beside `hrp-ood report`'s OOD tables in `<out>/report/`: accuracy.md, accuracy.tex (booktabs, as
report.tex) and accuracy.csv (a row per run),
and plots/noise_curves.png and plots/accuracy_vs_noise.png when the grid varies `noise`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hrp_ood.eval.report import (METRIC_LABELS, STD_DDOF, _new_figure, _save_png, format_mean_std,
                                 load_evaluations, noise_sort_key, ordered_values, to_latex, to_markdown)
from hrp_ood.io import atomic_write_text

ACCURACY = "test_acc"


def accuracy_frame(runs: dict[str, dict[str, Any]], last_rows: dict[str, dict[str, str]]) -> pd.DataFrame:
    """A row per run of `last_rows` (run → metrics.csv's last row): its grid values (as text) and ensemble test
    accuracy."""
    rows = [{**{key: str(value) for key, value in runs[name].items()}, ACCURACY: float(row["acc_ensemble"])}
            for name, row in last_rows.items() if row.get("acc_ensemble")]
    return pd.DataFrame(rows)


def accuracy_table(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Test accuracy, mean ± std over seeds: a row per grid point without seed (and `by`), a column per value of
    `by` when the grid varies it. The display text is table["cell"] (to_markdown / to_latex's input)."""
    keys = [key for key in frame.columns if key not in (ACCURACY, "seed")]
    rows = [key for key in keys if key != by] or ["all"]
    frame = frame.assign(all="all") if rows == ["all"] else frame
    stats = frame.groupby(keys if by in keys else rows, sort=False)[ACCURACY].agg(
        mean="mean", std=lambda v: v.std(ddof=STD_DDOF), n_seeds="count")
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
    caption = "Ensemble test accuracy (%) at the last epoch, mean ± std over seeds"
    written = {"accuracy_csv": out_dir / "accuracy.csv", "accuracy_markdown": out_dir / "accuracy.md",
               "accuracy_latex": out_dir / "accuracy.tex"}
    atomic_write_text(written["accuracy_csv"], frame.to_csv(index=False))
    atomic_write_text(written["accuracy_markdown"], to_markdown(table, caption))
    atomic_write_text(written["accuracy_latex"], to_latex(table, caption))
    return written


def noise_rate(name: str) -> float:
    return noise_sort_key(name)[2]


def _curve(ax: Any, frame: pd.DataFrame, value: str) -> None:
    """One line per method: mean of `value` over seeds against the noise rate, with a ± std band."""
    groups = frame.groupby("method", sort=False) if "method" in frame.columns else [("all", frame)]
    for method, runs in groups:
        stats = runs.assign(rate=runs["noise"].map(noise_rate)).groupby("rate")[value].agg(["mean", "std"])
        std = stats["std"].fillna(0.0)
        line, = ax.plot(stats.index, stats["mean"], marker="o", label=method)
        ax.fill_between(stats.index, stats["mean"] - std, stats["mean"] + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("noise rate (%)", fontsize=8)
    ax.legend(fontsize=7)


def noise_curve_figures(evals: list[Path], accuracy: pd.DataFrame, metrics: tuple[str, ...], ood: str,
                        out_dir: Path) -> dict[str, Path]:
    """plots/noise_curves.png (a row per postprocessor, a column per metric, on the `ood` column of the OOD
    sets) and plots/accuracy_vs_noise.png."""
    df = load_evaluations(evals)
    df = df[df["ood"] == ood]
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
    return "noise" in frame.columns and frame["noise"].nunique() > 1 and bool(
        np.isfinite(frame["noise"].map(noise_rate)).all())
