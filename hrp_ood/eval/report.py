"""`hrp-ood report`: comparison tables (CSV, Markdown, LaTeX) and plots from many ``eval.json`` files.

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

import hashlib
import io
import json
import logging
import math
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from hrp_ood.errors import UserError, shown
from hrp_ood.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_tpr_id")
REQUIRED_METRICS = ("auroc", "fpr95")
METRIC_LABELS = {
    "auroc": "AUROC",
    "fpr95": "FPR95",
    "aupr_in": "AUPR-In",
    "aupr_out": "AUPR-Out",
    "fpr95_tpr_id": "FPR95@TPR-ID",
    "id_accuracy": "ID acc.",
}
BY_CHOICES = ("noise", "dataset", "method", "net", "ood")
RUN_KEYS = ("method", "dataset", "noise", "net", "seed")  # what identifies one evaluation
CONTEXT_KEYS = ("dataset", "noise", "net")  # become row levels when they vary and are not `by`
ID_ACC_ROW = "ID acc."
MEAN_OOD = "mean"
STD_DDOF = 1
MISSING_CELL = "–"
SCORES_FILE = "scores.npz"
PNG_DPI = 100

# Noise modes in table order; a mode not listed comes after these, alphabetically.
NOISE_MODE_ORDER = ("none", "clean", "sym", "symflip", "asym")
_NOISE_NAME = re.compile(r"^(?P<mode>[a-z_]*?)(?P<rate>\d+(?:\.\d+)?)?$")


# --------------------------------------------------------------------------- loading


def load_evaluations(paths: Sequence[Path | str]) -> pd.DataFrame:
    """Read eval.json files into one long table: a row per (file, postprocessor, OOD set).

    Columns: ``path, checkpoint, checkpoint_sha256, method, dataset, noise, seed, net,
    id_accuracy, versions`` (JSON text), ``scores_sha256`` (of the scores.npz written with the
    file; empty for older files), ``postprocessor, ood`` and the metrics of
    :data:`METRICS` (×100; an optional metric absent from a file is NaN). The ``"mean"``
    OOD rows of each file are kept as they are. Raises :class:`UserError` naming the file
    when one is missing, unreadable or malformed, and when two files describe the same
    evaluation (same method, dataset, noise, net and seed), which would count a seed twice.
    """
    if not paths:
        raise UserError(
            "no eval.json given; pass the files written by `hrp-ood evaluate` (e.g. runs/*/eval_ensemble/eval.json)"
        )
    rows = [row for path in paths for row in _evaluation_rows(Path(path), _read_json(Path(path)))]
    frame = pd.DataFrame(rows)
    _check_unique_runs(frame)
    return frame


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{shown(path)}: no such file; pass eval.json files written by `hrp-ood evaluate`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable JSON file ({err}); re-run `hrp-ood evaluate` to rewrite it") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object as written by `hrp-ood evaluate`, got {type(data).__name__}")
    return data


def _bad_field(path: Path, field: str, expected: str) -> UserError:
    return UserError(
        f"{path}: field {field!r} is missing or not {expected}; is this an eval.json written by `hrp-ood evaluate`?"
    )


def _text(data: dict[str, Any], key: str, path: Path, *, required: bool = True) -> str:
    value = data.get(key)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    if value is None and not required:
        return ""
    raise _bad_field(path, key, "a string")


def _number(value: Any, field: str, path: Path, *, required: bool) -> float:
    if value is None and not required:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_field(path, field, "a number")
    return float(value)


def _evaluation_meta(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    seed = data.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _bad_field(path, "seed", "an integer")
    versions = data.get("versions") or {}
    files = data.get("files") or {}  # absent from eval.json files written before the outputs were one unit
    if not isinstance(files, dict):
        raise _bad_field(path, "files", "an object")
    return {
        "path": str(path),
        "checkpoint": _text(data, "checkpoint", path, required=False),
        "checkpoint_sha256": _text(data, "checkpoint_sha256", path, required=False),
        "method": _text(data, "method", path),
        "dataset": _text(data, "dataset", path),
        "noise": _text(data, "noise", path),
        "seed": seed,
        "net": _text(data, "net", path),
        "id_accuracy": _number(data.get("id_accuracy"), "id_accuracy", path, required=True),
        "versions": json.dumps(versions, sort_keys=True),
        "scores_sha256": _text(files, SCORES_FILE, path, required=False),
    }


def _evaluation_rows(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    meta = _evaluation_meta(path, data)
    results = data.get("results")
    if not isinstance(results, list) or not results:
        raise _bad_field(path, "results", "a non-empty list")
    rows, seen = [], set()
    for k, result in enumerate(results):
        if not isinstance(result, dict):
            raise _bad_field(path, f"results[{k}]", "an object")
        postprocessor = _text(result, "postprocessor", path)
        ood = _text(result, "ood", path)
        if (postprocessor, ood) in seen:
            raise UserError(f"{path}: results hold ({postprocessor}, {ood}) twice; re-run `hrp-ood evaluate`")
        seen.add((postprocessor, ood))
        row = dict(meta, postprocessor=postprocessor, ood=ood)
        for metric in METRICS:
            row[metric] = _number(
                result.get(metric), f"results[{k}].{metric}", path, required=metric in REQUIRED_METRICS
            )
        rows.append(row)
    return rows


def _check_unique_runs(frame: pd.DataFrame) -> None:
    runs = frame.drop_duplicates("path")
    duplicated = runs[runs.duplicated(list(RUN_KEYS), keep=False)]
    if duplicated.empty:
        return
    first = duplicated.iloc[0]
    clash = duplicated[(duplicated[list(RUN_KEYS)] == first[list(RUN_KEYS)]).all(axis=1)]["path"].tolist()
    identity = ", ".join(f"{key}={first[key]}" for key in RUN_KEYS)
    raise UserError(
        f"{' and '.join(clash)} are the same evaluation ({identity}); a mean over seeds needs "
        "one file per seed: report them separately"
    )


# --------------------------------------------------------------------------- ordering


def noise_sort_key(name: str) -> tuple[int, str, float, str]:
    """Natural order of noise names: none, sym20, sym50, sym80, sym100, ..., asym40, then others.

    A name is a mode followed by an optional rate; modes follow :data:`NOISE_MODE_ORDER`,
    rates compare as numbers (so ``sym100`` comes after ``sym80``).
    """
    match = _NOISE_NAME.match(name.lower())
    mode, rate = (match["mode"], float(match["rate"] or 0.0)) if match else (name.lower(), 0.0)
    rank = NOISE_MODE_ORDER.index(mode) if mode in NOISE_MODE_ORDER else len(NOISE_MODE_ORDER)
    return rank, mode, rate, name


def natural_sort_key(name: str) -> tuple[tuple[int, Any], ...]:
    """Order text with its digit runs compared as numbers (``cifar10`` < ``cifar100``)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name.lower()))


def ordered_values(values: Iterable[str], key: str) -> list[str]:
    """The distinct values of column `key` in table order.

    noise: :func:`noise_sort_key`; ood: first appearance with ``"mean"`` last; method and
    postprocessor: first appearance (the order the user gave); others: natural order.
    """
    distinct = list(dict.fromkeys(values))
    if key == "noise":
        return sorted(distinct, key=noise_sort_key)
    if key == "ood":
        return [v for v in distinct if v != MEAN_OOD] + [v for v in distinct if v == MEAN_OOD]
    if key in ("method", "postprocessor"):
        return distinct
    return sorted(distinct, key=natural_sort_key)


# --------------------------------------------------------------------------- aggregation


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


def _block_of(row: tuple[str, ...], row_keys: list[str]) -> tuple[Any, ...]:
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
        "% requires \\usepackage{booktabs}",
        r"\begin{tabular}{" + "l" * len(row_keys) + "c" * len(cells.columns) + "}",
        r"\toprule",
        line([*row_keys, *cells.columns]),
        r"\midrule",
    ]
    previous_block = None
    for row, values in zip(cells.index, cells.to_numpy()):
        block = _block_of(row, row_keys)
        if previous_block is not None and block != previous_block:
            lines.append(r"\midrule")
        lines.append(line([*row, *values]))
        previous_block = block
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _software_lines(df: pd.DataFrame) -> list[str]:
    """One Markdown bullet per distinct ``versions`` record of the inputs."""
    lines = []
    for versions in dict.fromkeys(df["versions"]):
        record = json.loads(versions)
        if record:
            lines.append("- " + ", ".join(f"{name} {value}" for name, value in record.items()))
    return lines


def _markdown_report(df: pd.DataFrame, table: pd.DataFrame, caption: str) -> str:
    runs = df.drop_duplicates("path")
    header = [
        "# hrp-ood report",
        "",
        f"{len(runs)} evaluation(s); methods: {', '.join(ordered_values(runs['method'], 'method'))}; "
        f"seeds: {', '.join(str(s) for s in sorted(runs['seed'].unique()))}.",
        "",
        "",
    ]
    software = _software_lines(df)
    footer = ["", "Software:", *software] if software else []
    return "\n".join(header) + to_markdown(table, caption) + "\n".join(footer) + ("\n" if footer else "")


# --------------------------------------------------------------------------- plots


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


def _plot_stem(run: pd.DataFrame) -> str:
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
        stem = _plot_stem(run)
        title = stem.replace("_", " ")
        written[f"hist:{stem}"] = _save_png(
            _histogram_figure(scores, postprocessors, ood_sets, title), out_dir / f"{stem}_hist.png"
        )
        written[f"roc:{stem}"] = _save_png(
            _roc_figure(scores, postprocessors, ood_sets, title), out_dir / f"{stem}_roc.png"
        )
    return written


# --------------------------------------------------------------------------- the report


def write_report(
    paths: Sequence[Path | str],
    out_dir: Path,
    *,
    by: str = "noise",
    metrics: Sequence[str] = ("auroc", "fpr95"),
    ood: str = MEAN_OOD,
    plots: bool = True,
) -> dict[str, Path]:
    """Read `paths` (eval.json files) and write the comparison report into `out_dir`.

    Files (each written atomically: temporary file + ``os.replace``):
    ``report.csv`` (the long numeric table of :func:`load_evaluations`), ``report_summary.csv``
    (:func:`summarize`), ``report.md`` and ``report.tex`` (:func:`comparison_table` as Markdown
    and booktabs LaTeX) and, with `plots`, ``plots/<stem>_hist.png`` / ``_roc.png`` per evaluation.
    Every input is checked before the first file is written. Returns ``{kind: path}``.
    """
    out_dir = Path(out_dir)
    df = load_evaluations(paths)
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
    atomic_write_text(written["markdown"], _markdown_report(df, table, caption))
    atomic_write_text(written["latex"], to_latex(table, caption))
    if plots:
        written.update(plot_evaluations(df, out_dir / "plots"))
    log.info("report of %d evaluation(s) written to %s", df["path"].nunique(), out_dir)
    return written
