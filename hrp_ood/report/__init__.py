"""Reporting, in one package: `hrp-ood report`'s tables (CSV, Markdown, LaTeX) and plots from many ``eval.json`` files.

Input: the ``eval.json`` files written by ``write_eval_outputs`` (one per evaluated checkpoint),
each with a ``scores.npz`` beside it holding the per-sample scores under the keys
``"<postprocessor>/id"`` and ``"<postprocessor>/<ood set>"`` (only the plots need it).

Aggregation over seeds: every table cell is ``mean ± std`` over the seeds of one
(method, postprocessor, column) group, with the **sample** standard deviation
(``ddof = 1``, :data:`STD_DDOF`, as pandas computes it); a group with one seed shows the mean
alone. Groups never mix datasets, noise levels or networks silently: when one of those varies
across the inputs and is not the table's column axis, it becomes an extra row level.

Sign convention (the one of :mod:`hrp_ood.eval.metrics`): a score is "higher = more
in-distribution" and OOD is the positive class, so ROC curves are built from ``-score``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from hrp_ood.io import atomic_write_text
from hrp_ood.report.evaluations import MEAN_OOD, load_evaluations
from hrp_ood.report.html import write_html_report
from hrp_ood.report.plots import check_score_files, plot_evaluations
from hrp_ood.report.tables import comparison_table, markdown_report, summarize, table_caption, to_latex

log = logging.getLogger(__name__)


def write_report(
    paths: Sequence[Path | str],
    out_dir: Path,
    *,
    by: str = "noise",
    metrics: Sequence[str] = ("auroc", "fpr95"),
    ood: str = MEAN_OOD,
    plots: bool = True,
    variants: Mapping[str, str] | None = None,
    html: bool = False,
) -> dict[str, Path]:
    """Read `paths` (eval.json files) and write the comparison report into `out_dir`.

    Files (each written atomically: temporary file + ``os.replace``):
    ``report.csv`` (the long numeric table of :func:`load_evaluations`), ``report_summary.csv``
    (:func:`summarize`), ``report.md`` and ``report.tex`` (:func:`comparison_table` as Markdown
    and booktabs LaTeX), with `plots`, ``plots/<stem>_hist.png`` / ``_roc.png`` per evaluation and, with `html`,
    ``report.html`` (:func:`~hrp_ood.report.html.write_html_report`: the table and those figures in one page).
    Every input is checked before the first file is written. Returns ``{kind: path}``.
    """
    out_dir = Path(out_dir)
    df = load_evaluations(paths, variants)
    table = comparison_table(df, by=by, metrics=metrics, ood=ood)
    caption = table_caption(table, by, metrics, ood)
    if plots:
        check_score_files(df)

    written = {
        "csv": out_dir / "report.csv",
        "summary_csv": out_dir / "report_summary.csv",
        "markdown": out_dir / "report.md",
        "latex": out_dir / "report.tex",
    }
    atomic_write_text(written["csv"], df.to_csv(index=False))
    atomic_write_text(written["summary_csv"], summarize(df, by, metrics, ood).to_csv(index=False))
    atomic_write_text(written["markdown"], markdown_report(df, table, caption))
    atomic_write_text(written["latex"], to_latex(table, caption))
    if plots:
        written.update(plot_evaluations(df, out_dir / "plots"))
    if html:
        written["html"] = write_html_report(out_dir, df, by=by, metrics=metrics, ood=ood, figures=written)
    log.info("report of %d evaluation(s) written to %s", df["path"].nunique(), out_dir)
    return written
