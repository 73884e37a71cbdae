"""Reading eval.json files into one table, and the orders of its values (noise, seeds, names)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from hrp_ood.errors import UserError, cut, shown

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
# What else an evaluation depends on: seeds of one (method, dataset, noise, net) must agree on all of it to be averaged.
# Absent from older files → None. OOD-set lists are compared as sets; `hyperparameters` only when not tuned per seed.
SETTING_KEYS = ("model", "epoch", "fit_labels", "benchmark", "backend", "ood_sets", "preprocessing", "hyperparameters")
PERCENT_RANGE = (0.0, 100.0)
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


def load_evaluations(paths: Sequence[Path | str], variants: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read eval.json files into one long table: a row per (file, postprocessor, OOD set).

    Columns: ``path, checkpoint, checkpoint_sha256, method, dataset, noise, seed, net,
    id_accuracy, versions`` (JSON text), ``scores_sha256`` (of the scores.npz written with the
    file; empty for older files), ``postprocessor, ood`` and the metrics of
    :data:`METRICS` (×100; an optional metric absent from a file is NaN). The ``"mean"``
    OOD rows of each file are kept as they are. Raises :class:`UserError` naming the file
    when one is missing, unreadable or malformed, and when two files describe the same
    evaluation (same method, dataset, noise, net and seed), which would count a seed twice. `variants` (path →
    label) tells apart evaluations of one method that differ in another setting (a sweep's grid over any config
    key): the label joins the method, "hrp (meta_bn=batch)".
    """
    if not paths:
        raise UserError(
            "no eval.json given; pass the files written by `hrp-ood evaluate` (e.g. runs/*/eval_ensemble/eval.json)"
        )
    rows = [row for path in paths for row in _evaluation_rows(Path(path), _read_json(Path(path)))]
    frame = pd.DataFrame(rows)
    for path, label in (variants or {}).items():
        frame.loc[frame["path"] == str(path), "method"] += f" ({label})"
    _check_unique_runs(frame)
    _check_seeds_agree(frame)
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
    low, high = PERCENT_RANGE
    if not low <= value <= high:  # NaN fails too
        raise UserError(
            f"{path}: {field} is {value!r}, not a percentage in [0, 100]; eval.json holds metrics ×100 as "
            "`hrp-ood evaluate` writes them: re-run it"
        )
    return float(value)


def _check_percent_scale(path: Path, rows: list[dict[str, Any]]) -> None:
    """A file whose every AUROC and ID accuracy is at most 1 holds fractions: averaged with percentages it would give
    45.5 ± 63.0 from 0.9 and 90."""
    values = [row["auroc"] for row in rows] + [rows[0]["id_accuracy"]]
    if max(values) <= 1.0:
        raise UserError(
            f"{path}: every AUROC and the ID accuracy are at most 1 (fractions?); eval.json holds percentages "
            "(×100) as `hrp-ood evaluate` writes them: re-run it, or multiply the values by 100"
        )


def _setting(data: dict[str, Any]) -> str:
    """The evaluation's settings besides its identity (SETTING_KEYS), as comparable JSON text."""
    tuned = isinstance(data.get("tuning"), dict) and bool(data["tuning"].get("enabled"))
    setting = {key: data.get(key) for key in SETTING_KEYS}
    if isinstance(setting["ood_sets"], list):
        setting["ood_sets"] = sorted(map(str, setting["ood_sets"]))
    if isinstance(setting["preprocessing"], dict):  # mean/std are measured on each run's own training split
        setting["preprocessing"] = {k: v for k, v in setting["preprocessing"].items() if k not in ("mean", "std")}
    if tuned:
        setting["hyperparameters"] = "tuned"
    return json.dumps(setting, sort_keys=True, default=str)


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
        "setting": _setting(data),
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
    _check_percent_scale(path, rows)
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


def _check_seeds_agree(frame: pd.DataFrame) -> None:
    """Seeds of one (method, dataset, noise, net) are averaged: refuse those that differ in another setting."""
    runs = frame.drop_duplicates("path")
    for _, group in runs.groupby(list(CONTEXT_KEYS) + ["method"], sort=False):
        if group["setting"].nunique() < 2:
            continue
        first = group.iloc[0]
        other = group[group["setting"] != first["setting"]].iloc[0]
        a, b = json.loads(first["setting"]), json.loads(other["setting"])
        differences = ", ".join(f"{key} ({cut(a[key])} vs {cut(b[key])})" for key in SETTING_KEYS if a[key] != b[key])
        raise UserError(
            f"{first['path']} and {other['path']} differ in {differences}: they are not seeds of one setting "
            f"({first['method']}, {first['noise']}); report them separately or evaluate them alike"
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
