"""Evaluation plots: per-sample score histograms and ROC curves from the scores.npz beside each eval.json."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from hrp_ood.errors import UserError
from hrp_ood.io import atomic_write
from hrp_ood.report.evaluations import MEAN_OOD, PNG_DPI, SCORES_FILE, ordered_values

log = logging.getLogger(__name__)


def roc_points(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the ROC curve with OOD as the positive class and the scores negated.

    Scores are "higher = more ID", so ``sklearn.metrics.roc_curve(is_ood, -score)``: TPR is the
    fraction of OOD samples detected, FPR the fraction of ID samples flagged as OOD.
    """
    is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    fpr, tpr, _ = skm.roc_curve(is_ood, -np.r_[id_scores, ood_scores])
    return fpr, tpr


def _score_keys(run: pd.DataFrame) -> list[str]:
    postprocessors = ordered_values(run["postprocessor"], "postprocessor")
    ood_sets = [o for o in ordered_values(run["ood"], "ood") if o != MEAN_OOD]
    return [f"{pp}/{name}" for pp in postprocessors for name in ("id", *ood_sets)]


def _scores_path(eval_path: str) -> Path:
    return Path(eval_path).with_name(SCORES_FILE)


def check_score_files(df: pd.DataFrame) -> None:
    """Fail before anything is written if a scores.npz the plots need is missing, corrupt, incomplete or not
    the one its eval.json was written with."""
    for eval_path, run in df.groupby("path", sort=False):
        with _open_scores(eval_path, run["scores_sha256"].iloc[0]) as scores:
            missing = [k for k in _score_keys(run) if k not in scores.files]
        if missing:
            raise UserError(
                f"{_scores_path(eval_path)} lacks the score arrays {', '.join(missing)}; "
                "re-run `hrp-ood evaluate`, or pass --no-plots"
            )


def _open_scores(eval_path: str, expected_sha256: str) -> Any:
    """The scores.npz beside `eval_path`, read once and checked against the sha256 its eval.json records."""
    path = _scores_path(eval_path)
    if not path.is_file():
        raise UserError(
            f"{path}: no such file (the plots need the scores beside eval.json); "
            "re-run `hrp-ood evaluate`, or pass --no-plots"
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err}); re-run `hrp-ood evaluate`, or pass --no-plots") from None
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise UserError(
            f"{path} is not the scores.npz its {Path(eval_path).name} was written with (sha256 differs): "
            "an evaluation into that folder failed or was interrupted part-way; re-run "
            "`hrp-ood evaluate`, or pass --no-plots"
        )
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(
            f"{path}: not a readable .npz file ({err}); re-run `hrp-ood evaluate`, or pass --no-plots"
        ) from err


def _load_scores(eval_path: str, expected_sha256: str, keys: list[str]) -> dict[str, np.ndarray]:
    path = _scores_path(eval_path)
    with _open_scores(eval_path, expected_sha256) as scores:
        try:
            loaded = {key: np.asarray(scores[key], dtype=np.float64).ravel() for key in keys}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise UserError(
                f"{path}: cannot read its score arrays ({err}); re-run `hrp-ood evaluate`, or pass --no-plots"
            ) from err
    return {key: values[np.isfinite(values)] for key, values in loaded.items()}


def plot_stem(run: pd.DataFrame) -> str:
    first = run.iloc[0]
    stem = f"{first['method']}_{first['dataset']}_{first['noise']}_{first['net']}_seed{first['seed']}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


def _new_figure(n_rows: int, n_cols: int, width: float, height: float) -> tuple[Any, np.ndarray]:
    # An explicit Agg canvas renders headless without pyplot and without touching the
    # process-wide backend (a notebook calling write_report keeps its own).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    return figure, axes


def _histogram_figure(scores: dict[str, np.ndarray], postprocessors: list[str], ood_sets: list[str], title: str) -> Any:
    """Grid: a row per postprocessor, a column per OOD set; ID vs OOD score densities on shared bins."""
    figure, axes = _new_figure(len(postprocessors), len(ood_sets), 2.8, 2.2)
    for i, pp in enumerate(postprocessors):
        for j, name in enumerate(ood_sets):
            id_scores, ood_scores = scores[f"{pp}/id"], scores[f"{pp}/{name}"]
            bins = np.histogram_bin_edges(np.r_[id_scores, ood_scores], bins=40)
            ax = axes[i, j]
            ax.hist(id_scores, bins=bins, density=True, alpha=0.55, label="ID")
            ax.hist(ood_scores, bins=bins, density=True, alpha=0.55, label=f"OOD: {name}")
            ax.set_title(f"{pp} · {name}", fontsize=9)
            ax.set_xlabel("score (higher = more ID)", fontsize=8)
            ax.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    return figure


def _roc_figure(scores: dict[str, np.ndarray], postprocessors: list[str], ood_sets: list[str], title: str) -> Any:
    """A panel per postprocessor with one ROC curve per OOD set (OOD positive, score negated)."""
    figure, axes = _new_figure(1, len(postprocessors), 3.4, 3.2)
    for ax, pp in zip(axes[0], postprocessors):
        for name in ood_sets:
            fpr, tpr = roc_points(scores[f"{pp}/id"], scores[f"{pp}/{name}"])
            ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * skm.auc(fpr, tpr):.1f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)  # the FPR95 operating point
        ax.set_title(pp, fontsize=9)
        ax.set_xlabel("FPR: ID flagged as OOD", fontsize=8)
        ax.set_ylabel("TPR: OOD detected\n(OOD = positive, score negated)", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    figure.suptitle(title, fontsize=10)
    return figure


def _save_png(figure: Any, path: Path) -> Path:
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=PNG_DPI))
    return path


def plot_evaluations(df: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Per evaluation, ``<stem>_hist.png`` (score histograms, postprocessor × OOD set) and
    ``<stem>_roc.png`` (ROC curves per OOD set, a panel per postprocessor), from each scores.npz.

    Returns ``{"hist:<stem>": path, "roc:<stem>": path, ...}``.
    """
    written = {}
    for eval_path, run in df.groupby("path", sort=False):
        postprocessors = ordered_values(run["postprocessor"], "postprocessor")
        ood_sets = [o for o in ordered_values(run["ood"], "ood") if o != MEAN_OOD]
        scores = _load_scores(eval_path, run["scores_sha256"].iloc[0], _score_keys(run))
        stem = plot_stem(run)
        title = stem.replace("_", " ")
        written[f"hist:{stem}"] = _save_png(
            _histogram_figure(scores, postprocessors, ood_sets, title), out_dir / f"{stem}_hist.png"
        )
        written[f"roc:{stem}"] = _save_png(
            _roc_figure(scores, postprocessors, ood_sets, title), out_dir / f"{stem}_roc.png"
        )
    return written


# --------------------------------------------------------------------------- the report
