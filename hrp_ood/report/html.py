"""report.html: the whole report in one self-contained page (`hrp-ood report --html`, every sweep).

The page holds the OOD table of :func:`~hrp_ood.report.tables.comparison_table`, a sweep's accuracy and training
summary tables (:mod:`hrp_ood.report.sweep`), the PNG figures already written beside it (noise curves, per
evaluation the ROC curves and score histograms) inline as base64 ``data:`` URIs, and the list of evaluations with
relative links to each run's folder and evaluation folder. Nothing is fetched: no script, no external style sheet,
font or image, so it opens offline in any browser. Every text that comes from a file (method, set and run names,
paths) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from hrp_ood import __version__
from hrp_ood.io import atomic_write_text
from hrp_ood.report.evaluations import ID_ACC_ROW, MEAN_OOD, RUN_KEYS
from hrp_ood.report.plots import plot_stem
from hrp_ood.report.sweep import ACCURACY_CAPTION, SUMMARY_CAPTION, accuracy_table, summary_table
from hrp_ood.report.tables import block_of, comparison_table, evaluations_line, software_versions, table_caption

HTML_FILE = "report.html"

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  color: #222; background: #fff; margin: 0 auto; padding: 1.2em 2em 3em; max-width: 1400px; }
h1 { font-size: 1.6em; margin: 0 0 .2em; }
h2 { font-size: 1.25em; margin: 1.8em 0 .5em; padding-bottom: .2em; border-bottom: 1px solid #ddd; }
p.meta, footer { color: #555; }
nav a { margin-right: 1.2em; }
a { color: #7a3e9d; }
table { border-collapse: collapse; margin: 0 0 1.2em; font-variant-numeric: tabular-nums; }
p.caption { color: #555; margin: .3em 0; max-width: 80em; }
th, td { padding: .25em .75em; border-bottom: 1px solid #e4e4e4; white-space: nowrap; }
th { background: #f3f3f3; text-align: left; border-bottom: 2px solid #bbb; }
td.cell, th.col { text-align: center; }
tbody tr:nth-child(even) { background: #fafafa; }
tr.block-start td { border-top: 2px solid #bbb; }
tr.accuracy td { font-style: italic; }
.scroll { overflow-x: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
figure { margin: .6em 0 1em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; }
details { margin: .6em 0; border: 1px solid #ddd; border-radius: 4px; padding: .3em .8em; }
summary { cursor: pointer; font-weight: 600; }
"""


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def html_table(table: pd.DataFrame, caption: str = "") -> str:
    """``<table>`` of ``table["cell"]`` (the display text of comparison_table, accuracy_table or summary_table, as
    :func:`~hrp_ood.report.tables.to_markdown` reads it): a header of the row-key and column names, a heavier rule
    between row blocks (:func:`~hrp_ood.report.tables.block_of`), every text escaped."""
    cells = table["cell"]
    row_keys = list(cells.index.names)
    head = "".join(f"<th>{_escape(name)}</th>" for name in row_keys)
    head += "".join(f'<th class="col">{_escape(column)}</th>' for column in cells.columns)
    body, previous = [], None
    for row, values in zip(cells.index, cells.to_numpy()):
        row = row if isinstance(row, tuple) else (row,)
        block = block_of(row, row_keys)
        classes = ["block-start"] if previous is not None and block != previous else []
        classes += ["accuracy"] if dict(zip(row_keys, row)).get("postprocessor") == ID_ACC_ROW else []
        attribute = f' class="{" ".join(classes)}"' if classes else ""
        keys = "".join(f"<td>{_escape(value)}</td>" for value in row)
        numbers = "".join(f'<td class="cell">{_escape(value)}</td>' for value in values)
        body.append(f"<tr{attribute}>{keys}{numbers}</tr>")
        previous = block
    caption_html = f'<p class="caption">{_escape(caption)}</p>' if caption else ""
    return (
        f'{caption_html}<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def html_figure(path: Path, caption: str) -> str:
    """``<figure>`` with the PNG at `path` inline as a base64 data URI."""
    data = Path(path).read_bytes()
    width, height = _png_size(data)
    source = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="{source}" width="{width}" height="{height}" alt="{_escape(caption)}">'
        f"<figcaption>{_escape(caption)}</figcaption></figure>"
    )


def _href(target: Path, out_dir: Path) -> str:
    """A link to the folder `target`, relative to the page in `out_dir` (absolute file:// URI across drives)."""
    try:
        relative = Path(os.path.relpath(Path(target).resolve(), Path(out_dir).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(target).resolve().as_uri() + "/"
    return quote(relative) + "/"


def _run_folder(checkpoint: str, eval_dir: Path) -> Path:
    """The folder of the evaluated checkpoint when it is there, else the evaluation's folder."""
    if checkpoint and Path(checkpoint).parent.is_dir():
        return Path(checkpoint).parent
    return eval_dir


def _link(target: Path, out_dir: Path) -> str:
    """The folder's name, linked; its whole path in the tooltip."""
    path = Path(target).resolve().as_posix()
    return f'<a href="{_escape(_href(target, out_dir))}" title="{_escape(path)}">{_escape(Path(target).name)}</a>'


def _evaluations_html(df: pd.DataFrame, out_dir: Path, figures: Mapping[str, Path]) -> tuple[str, str]:
    """The run list (a row per evaluation, links to its run and evaluation folders and to its figures) and the
    per-evaluation figure sections (ROC curves, score histograms)."""
    rows, sections = [], []
    for k, (eval_path, run) in enumerate(df.groupby("path", sort=False)):
        first = run.iloc[0]
        stem = plot_stem(run)
        anchor = f"evaluation-{k}"
        label = f"{first['method']} · {first['dataset']} · {first['noise']} · {first['net']} · seed {first['seed']}"
        panels = [
            html_figure(figures[key], caption)
            for key, caption in (
                (f"roc:{stem}", "ROC curves: a curve per OOD set (OOD = positive, score negated)"),
                (f"hist:{stem}", "Score histograms: ID against each OOD set"),
            )
            if key in figures
        ]
        if panels:
            figures_html = f'<div class="figures">{"".join(panels)}</div>'
            sections.append(f'<details open id="{anchor}"><summary>{_escape(label)}</summary>{figures_html}</details>')
        eval_dir = Path(eval_path).parent
        cells = [first[key] for key in RUN_KEYS]
        cells_html = "".join(f"<td>{_escape(value)}</td>" for value in cells)
        cells_html += f'<td class="cell">{first["id_accuracy"]:.2f}</td>'
        cells_html += f'<td><a href="#{anchor}">figures</a></td>' if panels else "<td>–</td>"
        cells_html += f"<td>{_link(_run_folder(first['checkpoint'], eval_dir), out_dir)}</td>"
        cells_html += f"<td>{_link(eval_dir, out_dir)}</td>"
        rows.append(f"<tr>{cells_html}</tr>")
    head = "".join(
        f"<th>{name}</th>"
        for name in ("method", "dataset", "noise", "net", "seed", "ID acc. (%)", "plots", "run folder", "evaluation")
    )
    run_list = (
        '<p class="caption">Every evaluation of the report; the links open the run folder (of the evaluated '
        "checkpoint) and the evaluation folder (eval.json, scores.npz)</p>"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
    )
    return run_list, "".join(sections)


def write_html_report(
    out_dir: Path,
    df: pd.DataFrame,
    *,
    by: str = "noise",
    metrics: Sequence[str] = ("auroc", "fpr95"),
    ood: str = MEAN_OOD,
    figures: Mapping[str, Path] | None = None,
    accuracy: pd.DataFrame | None = None,
    title: str = "hrp-ood report",
) -> Path:
    """Write ``<out_dir>/report.html`` (atomically) and return its path.

    `df`: the evaluations (:func:`~hrp_ood.report.evaluations.load_evaluations`), tabulated by `by` / `metrics` /
    `ood` as in the Markdown report; `figures`: ``{kind: png}`` as write_report and noise_curve_figures return them
    (``roc:<stem>``, ``hist:<stem>``, ``noise_curves``, ``accuracy_vs_noise``), the ones present are embedded;
    `accuracy`: a sweep's :func:`~hrp_ood.report.sweep.accuracy_frame` for its accuracy and summary tables.
    """
    out_dir, figures = Path(out_dir), figures or {}
    table = comparison_table(df, by=by, metrics=metrics, ood=ood)
    sections = [("ood", "OOD detection", html_table(table, table_caption(table, by, metrics, ood)))]
    if accuracy is not None and not accuracy.empty:
        sections.append(("accuracy", "Test accuracy", html_table(accuracy_table(accuracy, by), ACCURACY_CAPTION)))
        sections.append(("summary", "Training summary", html_table(summary_table(accuracy), SUMMARY_CAPTION)))
    curves = [
        html_figure(figures[key], caption)
        for key, caption in (
            ("noise_curves", "OOD metrics against the noise rate: mean over seeds, ± std band, a line per method"),
            ("accuracy_vs_noise", "Ensemble test accuracy against the noise rate: mean over seeds, ± std band"),
        )
        if key in figures
    ]
    if curves:
        sections.append(("noise", "Against label noise", f'<div class="figures">{"".join(curves)}</div>'))
    run_list, per_evaluation = _evaluations_html(df, out_dir, figures)
    sections.append(("runs", "Runs", run_list))
    if per_evaluation:
        sections.append(("evaluations", "ROC curves and score histograms", per_evaluation))
    nav = "".join(f'<a href="#{anchor}">{_escape(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(
        f'<section id="{anchor}"><h2>{_escape(heading)}</h2>{content}</section>'
        for anchor, heading, content in sections
    )
    software = "; ".join(software_versions(df))
    text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_escape(title)}</h1>"
        f'<p class="meta">{_escape(evaluations_line(df))}</p>'
        f"<nav>{nav}</nav>{body}"
        + f"<footer><p>Software of the evaluations: {_escape(software or 'not recorded')}. Report written by "
        f"hrp-ood {_escape(__version__)}.</p></footer>" + "</body></html>\n"
    )
    path = out_dir / HTML_FILE
    atomic_write_text(path, text)
    return path
