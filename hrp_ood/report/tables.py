"""Comparison tables over seeds: mean ± std per (method, postprocessor, column), as Markdown and LaTeX."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from hrp_ood import __version__
from hrp_ood.errors import UserError
from hrp_ood.report.evaluations import (
    BY_CHOICES,
    CONTEXT_KEYS,
    ID_ACC_ROW,
    MEAN_OOD,
    METRIC_LABELS,
    METRICS,
    MISSING_CELL,
    STD_DDOF,
    ordered_values,
)

log = logging.getLogger(__name__)


def _check_by_and_metrics(by: str, metrics: Sequence[str]) -> None:
    if by not in BY_CHOICES:
        raise UserError(f"cannot tabulate by {by!r}; choose one of {', '.join(BY_CHOICES)}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")


def _select_ood(df: pd.DataFrame, by: str, ood: str) -> pd.DataFrame:
    """All OOD sets when they are the columns, else the rows of the one OOD set asked for."""
    if by == "ood":
        return df
    available = ordered_values(df["ood"], "ood")
    if ood not in available:
        raise UserError(f"no results for OOD set {ood!r}; available: {', '.join(available)}")
    return df[df["ood"] == ood]


def _row_keys(data: pd.DataFrame, by: str) -> list[str]:
    """(method, postprocessor), led by any dataset/noise/net that varies and is not `by`."""
    extras = [key for key in CONTEXT_KEYS if key != by and data[key].nunique() > 1]
    return extras + [key for key in ("method", "postprocessor") if key != by]


def _seed_stats(values: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """mean, std (ddof = STD_DDOF) and count of the non-NaN ``value``s of each group: one value per seed."""
    grouped = values.groupby(keys, sort=False, dropna=False)["value"]
    stats = grouped.agg(mean="mean", std=lambda v: v.std(ddof=STD_DDOF), n_seeds="count")
    return stats.reset_index()


def _summary(df: pd.DataFrame, by: str, metrics: Sequence[str], ood: str) -> tuple[pd.DataFrame, list[str]]:
    _check_by_and_metrics(by, metrics)
    data = _select_ood(df, by, ood)
    row_keys = _row_keys(data, by)
    group_keys = row_keys + [by, "metric"]
    metric_values = data.melt(
        id_vars=row_keys + [by, "seed"], value_vars=list(metrics), var_name="metric", value_name="value"
    )
    # ID accuracy is one number per evaluation: take it once per (file, column).
    runs = data.drop_duplicates(["path", by])
    accuracy_values = (
        runs[[k for k in row_keys if k != "postprocessor"] + [by, "seed", "id_accuracy"]]
        .rename(columns={"id_accuracy": "value"})
        .assign(metric="id_accuracy", postprocessor=ID_ACC_ROW)
    )
    summary = pd.concat(
        [_seed_stats(metric_values, group_keys), _seed_stats(accuracy_values, group_keys)], ignore_index=True
    )
    return _in_table_order(summary, row_keys + [by]), row_keys


def _in_table_order(summary: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows sorted by each key's :func:`ordered_values` (metrics keep their given order)."""
    ranks = {key: {v: i for i, v in enumerate(ordered_values(summary[key], key))} for key in keys}
    return summary.sort_values(
        keys, key=lambda column: column.map(ranks[column.name]), kind="stable", ignore_index=True
    )


def summarize(
    df: pd.DataFrame, by: str = "noise", metrics: Sequence[str] = ("auroc", "fpr95"), ood: str = MEAN_OOD
) -> pd.DataFrame:
    """Tidy numeric summary over seeds: one row per (row keys, `by` value, metric).

    Columns: the row keys of :func:`comparison_table`, `by`, ``metric`` (one of `metrics`, or
    ``id_accuracy`` on the rows whose postprocessor is ``"ID acc."``), ``mean``, ``std``
    (ddof = 1, NaN for one seed) and ``n_seeds``.
    """
    return _summary(df, by, metrics, ood)[0]


def format_mean_std(mean: float, std: float, decimals: int = 1) -> str:
    """``"mean ± std"``; ``"mean"`` when std is NaN (one seed); ``"–"`` when there is no value."""
    if not np.isfinite(mean):
        return MISSING_CELL
    if not np.isfinite(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def table_fields(metrics: Sequence[str]) -> list[str]:
    """Level-0 column names of :func:`comparison_table`: the text cell, then the numbers behind it."""
    numeric = [f"{m}_{stat}" for m in (*metrics, "id_accuracy") for stat in ("mean", "std")]
    return ["cell", *numeric, "n_seeds"]


def comparison_table(
    df: pd.DataFrame,
    by: str = "noise",
    metrics: Sequence[str] = ("auroc", "fpr95"),
    ood: str = MEAN_OOD,
    *,
    decimals: int = 1,
) -> pd.DataFrame:
    """Methods × postprocessors against the values of `by`, each cell mean ± std over seeds.

    Rows: a MultiIndex (method, postprocessor) — without the level named by `by`, and led by
    dataset / noise / net when one of them varies (so different settings are never averaged) —
    followed, per leading group, by an ``"ID acc."`` row block (postprocessor = ``"ID acc."``).
    Columns: a MultiIndex (field, `by` value) with `by` values in table order
    (:func:`ordered_values`; noise naturally: none, sym20, sym50, sym80, asym40, ...). Field
    ``"cell"`` is the text, e.g. ``"95.0 ± 0.3 / 17.4 ± 1.2"`` for AUROC/FPR95 (just the means
    with one seed; ``"–"`` where no run exists); the numeric fields ``<metric>_mean``,
    ``<metric>_std`` (ddof = 1), ``id_accuracy_mean``/``_std`` and ``n_seeds`` hold the numbers
    (``table["cell"]`` is the display table, ``table["auroc_mean"]`` the numbers).
    `ood` picks the OOD set shown (default the mean over sets); ignored when ``by == "ood"``.
    """
    summary, row_keys = _summary(df, by, metrics, ood)
    stats = summary.set_index(row_keys + [by, "metric"])[["mean", "std", "n_seeds"]].unstack("metric")
    fields = pd.DataFrame(index=stats.index)
    for metric in (*metrics, "id_accuracy"):
        fields[f"{metric}_mean"] = stats[("mean", metric)]
        fields[f"{metric}_std"] = stats[("std", metric)]
    is_accuracy = fields.index.get_level_values("postprocessor") == ID_ACC_ROW
    fields["n_seeds"] = np.where(is_accuracy, stats[("n_seeds", "id_accuracy")], stats[("n_seeds", metrics[0])])
    fields["cell"] = [
        format_mean_std(row["id_accuracy_mean"], row["id_accuracy_std"], decimals)
        if accuracy
        else " / ".join(format_mean_std(row[f"{m}_mean"], row[f"{m}_std"], decimals) for m in metrics)
        for accuracy, (_, row) in zip(is_accuracy, fields.iterrows())
    ]
    table = fields.unstack(by)
    if not isinstance(table.index, pd.MultiIndex):  # one row key (by=method over one setting): keep the row levels
        table.index = pd.MultiIndex.from_arrays([table.index], names=row_keys)
    columns = pd.MultiIndex.from_product([table_fields(metrics), ordered_values(summary[by], by)], names=["field", by])
    table = table.reindex(index=_ordered_rows(table.index, row_keys, summary), columns=columns)
    table["cell"] = table["cell"].fillna(MISSING_CELL)
    return table


def _ordered_rows(index: pd.Index, row_keys: list[str], summary: pd.DataFrame) -> pd.MultiIndex:
    """Leading context keys in table order, then metric rows before the ID-acc. block, then the
    order methods and postprocessors were given in."""
    rows = [row if isinstance(row, tuple) else (row,) for row in index]
    orders = {key: ordered_values(summary[key], key) for key in row_keys}
    n_context = sum(key in CONTEXT_KEYS for key in row_keys)  # context keys lead the row keys
    pp_level = row_keys.index("postprocessor")

    def key(row: tuple[str, ...]) -> tuple[Any, ...]:
        ranks = [orders[k].index(v) for k, v in zip(row_keys, row)]
        return (*ranks[:n_context], row[pp_level] == ID_ACC_ROW, *ranks[n_context:])

    return pd.MultiIndex.from_tuples(sorted(rows, key=key), names=row_keys)


def block_of(row: tuple[str, ...], row_keys: list[str]) -> tuple[Any, ...]:
    """Rows of one block share their context keys and whether they are ID-accuracy rows."""
    context = tuple(v for k, v in zip(row_keys, row) if k in CONTEXT_KEYS)
    return (*context, dict(zip(row_keys, row)).get("postprocessor") == ID_ACC_ROW)


# --------------------------------------------------------------------------- rendering


def table_caption(table: pd.DataFrame, by: str, metrics: Sequence[str], ood: str) -> str:
    """One line saying what the cells are: metrics, units, aggregation, OOD set, seed counts."""
    seeds = sorted({int(n) for n in np.ravel(table["n_seeds"].to_numpy()) if np.isfinite(n)})
    if len(seeds) == 1:
        seed_text = f"{seeds[0]} seed" + ("s" if seeds[0] != 1 else "")
    else:
        seed_text = f"{seeds[0]}–{seeds[-1]} seeds"
    where = "" if by == "ood" else f"; OOD set: {ood}"
    return (
        f"{'/'.join(METRIC_LABELS[m] for m in metrics)} (%), mean ± std over {seed_text} "
        f"(sample std, ddof={STD_DDOF}){where}; {ID_ACC_ROW} = ID test accuracy (%)"
    )


def to_markdown(table: pd.DataFrame, caption: str = "") -> str:
    """GitHub Markdown of ``table["cell"]``: a header row with the row-key and column names."""
    cells = table["cell"]

    def line(values: Iterable[str]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    header = [*cells.index.names, *cells.columns]
    rule = "|" + "|".join(["---"] * cells.index.nlevels + [":---:"] * len(cells.columns)) + "|"
    body = [line([*row, *values]) for row, values in zip(cells.index, cells.to_numpy())]
    lines = ([caption, ""] if caption else []) + [line(header), rule, *body]
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_SYMBOLS = {"±": r"$\pm$", "–": "--"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (``_`` → ``\\_`` ...), then typeset ± and –."""
    escaped = "".join(_LATEX_SPECIALS.get(char, char) for char in str(text))
    for symbol, latex in _LATEX_SYMBOLS.items():
        escaped = escaped.replace(symbol, latex)
    return escaped


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    """booktabs ``tabular`` of ``table["cell"]``, a ``\\midrule`` between row blocks.

    Needs ``\\usepackage{booktabs}``; every text is escaped with :func:`latex_escape`.
    """
    cells = table["cell"]
    row_keys = list(cells.index.names)

    def line(values: Iterable[str]) -> str:
        return " & ".join(latex_escape(v) for v in values) + r" \\"

    lines = [f"% {latex_escape(caption)}"] if caption else []
    lines += [
        f"% hrp-ood {__version__}; requires \\usepackage{{booktabs}}",
        r"\begin{tabular}{" + "l" * len(row_keys) + "c" * len(cells.columns) + "}",
        r"\toprule",
        line([*row_keys, *cells.columns]),
        r"\midrule",
    ]
    previous_block = None
    for row, values in zip(cells.index, cells.to_numpy()):
        block = block_of(row, row_keys)
        if previous_block is not None and block != previous_block:
            lines.append(r"\midrule")
        lines.append(line([*row, *values]))
        previous_block = block
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def software_versions(df: pd.DataFrame) -> list[str]:
    """One line ("torch 2.14.1, hrp_ood 0.1.0") per distinct ``versions`` record of the evaluations."""
    records = [json.loads(versions) for versions in dict.fromkeys(df["versions"])]
    return [", ".join(f"{name} {value}" for name, value in record.items()) for record in records if record]


def evaluations_line(df: pd.DataFrame) -> str:
    """ "6 evaluation(s); methods: hrp, ce; seeds: 0, 1": what a report is made of, its first line."""
    runs = df.drop_duplicates("path")
    methods = ", ".join(ordered_values(runs["method"], "method"))
    seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique()))
    return f"{len(runs)} evaluation(s); methods: {methods}; seeds: {seeds}"


def markdown_report(df: pd.DataFrame, table: pd.DataFrame, caption: str) -> str:
    header = ["# hrp-ood report", "", f"{evaluations_line(df)}.", "", ""]
    versions = [f"- {line}" for line in software_versions(df)]
    footer = ["", "Software of the evaluations:", *versions, "", f"Report written by hrp-ood {__version__}."]
    return "\n".join(header) + to_markdown(table, caption) + "\n".join(footer) + "\n"


# --------------------------------------------------------------------------- plots
