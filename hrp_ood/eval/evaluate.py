"""The evaluation pipeline (SPEC §4): one cached pass per dataset, every postprocessor fitted once, metrics, files.

    ID train ──pass──▶ FeatureSet ──fit──▶ postprocessor ◀──score── FeatureSet ◀──pass── ID test, OOD sets

Each dataset (ID train, ID test, every OOD set) goes through the network exactly once and its
(logits, features) are cached on disk (`features.cached_features`); a second evaluation of the same
checkpoint reads the cache and runs no forward pass. Postprocessors that need the network itself
(`needs_network`, e.g. ODIN with input perturbation) cannot work from cached outputs: they get their
own, uncached, pass over ID test and every OOD set through `score_batch(net, x)`.

With a validation split (ID-val, OOD-val; `hrp_ood.eval.validation`), methods OpenOOD fits on ID-val
(ReAct's percentile, `fit_split = "val"`) fit there, and `tune=True` runs OpenOOD's parameter search
(`hrp_ood.eval.tuning`) for every method that has one before scoring. What each method used is returned in
`EvalResult.settings` (eval.json).

Metrics follow `hrp_ood.eval.metrics` (OOD positive, ×100); the "mean" row of a postprocessor is the
mean over OOD sets of each metric, as OpenOOD reports it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hrp_ood.data import DataBundle
from hrp_ood.data.sources import ImageSource, pixels, select
from hrp_ood.errors import UserError
from hrp_ood.eval.features import batches, cached_features, channel_stats, decode_unless_cached, normalise_batch
from hrp_ood.eval.metrics import accuracy, ood_metrics
from hrp_ood.eval.tuning import SELECTION_RULE, SearchResult, search_openood
from hrp_ood.eval.validation import ValidationImages, require_both_parts
from hrp_ood.io import atomic_write, atomic_write_text
from hrp_ood.postprocessors import Postprocessor, create_postprocessor
from hrp_ood.postprocessors.featureset import FeatureSet

log = logging.getLogger(__name__)

METRIC_KEYS = ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_tpr_id")
ROW_KEYS = ("postprocessor", "ood", *METRIC_KEYS)
FIT_LABELS = ("clean", "noisy", "pred")
MEAN_ROW = "mean"
ID_SET = "id"  # the ID test set's name in scores.npz
# names a results table or scores.npz uses for something else ("all" is --ood's keyword for every far-OOD set)
RESERVED_SET_NAMES = (ID_SET, MEAN_ROW, "all")
FIT_SUBSET_SEED = 0


def check_ood_set_names(names: Iterable[str], where: str) -> None:
    """A one-line error for an OOD set named like the ID set or a table's mean row."""
    reserved = [name for name in names if name.strip().lower() in RESERVED_SET_NAMES]
    if reserved:
        raise UserError(
            f"{where}: OOD set name {reserved[0]!r} is reserved ({', '.join(RESERVED_SET_NAMES)} name the "
            "ID test set, the mean over OOD sets and every far-OOD set); give the set another name"
        )


@dataclass
class EvalResult:
    """rows: one per (postprocessor, OOD set) plus one "mean" row per postprocessor (keys ROW_KEYS);
    id_accuracy: top-1 accuracy ×100 on ID test; scores: "<postprocessor>/id" and "<postprocessor>/<ood set>";
    settings: what the postprocessors used (hyper-parameters, the split each was fitted on, the search)."""

    rows: list[dict[str, Any]]
    id_accuracy: float
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def run_evaluation(
    net: nn.Module,
    id_bundle: DataBundle,
    ood_images: dict[str, torch.Tensor | ImageSource],
    postprocessors: list[str],
    *,
    cache_dir: str | Path,
    cache_key: str,
    fit_labels: str = "clean",
    noisy_train_labels: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    amp: bool = False,
    progress: bool = False,
    fit_subset: int | None = None,
    validation: ValidationImages | None = None,
    tune: bool = False,
) -> EvalResult:
    """Score ID test and every OOD set with every postprocessor (module docstring for the passes).

    fit_labels: the labels fitted postprocessors (MDS, …) see with the ID-train features — "clean" (the
    dataset's labels, OpenOOD's convention), "noisy" (`noisy_train_labels`, what the practitioner has) or
    "pred" (the network's own argmax). fit_subset: fit on that many training images, drawn without
    replacement with a fixed seed (cached under its own key). cache_key must identify the checkpoint and
    the net choice; dataset, split, image size and normalisation are appended here. validation: ID-val /
    OOD-val images; tune: run OpenOOD's parameter search on them (both needed).
    """
    if not ood_images:
        raise UserError("no OOD set to evaluate; give at least one with --ood / --ood-dir")
    defaults = [_for_dataset(create_postprocessor(name), id_bundle) for name in postprocessors]
    if tune:
        require_both_parts(validation)
    device = torch.device(device)
    net = net.to(device).eval()
    extract = dict(cache_dir=cache_dir, batch_size=batch_size, device=device, amp=amp, progress=progress)
    mean, std = id_bundle.mean, id_bundle.std
    prefix = f"{cache_key}-{id_bundle.name}-{_transform_tag(id_bundle)}"
    score = SetScorer(net, mean, std, device, batch_size)
    ood_keys = {name: f"{prefix}-ood-{name}" for name in ood_images}
    for name, images in ood_images.items():  # an unreadable OOD image fails before the first pass
        decode_unless_cached(images, cache_dir=cache_dir, key=ood_keys[name])

    val = _validation_features(net, validation, mean, std, prefix, extract)
    fit_sets = {"id_val": val["id"][1]} if "id" in val else {}
    if any(_fit_on(m, fit_sets) == "id_train" for m in defaults):
        fit_sets["id_train"] = _fit_features(
            net, id_bundle, fit_labels, noisy_train_labels, fit_subset, prefix, extract
        )
    fc = net.get_fc() if any(m.requires_fit for m in defaults) else None
    settings: dict[str, Any] = {
        "hyperparameters": {},
        "fit_on": {},
        "validation": _describe(validation),
        "tuning": {"enabled": tune},
    }
    methods = []
    for default in defaults:
        fit_on = _fit_on(default, fit_sets)
        fit_set = fit_sets.get(fit_on) if fit_on else None
        if tune and default.openood_sweep:
            method, search = _searched(default.name, default.openood_sweep, id_bundle, fit_set, fc, val, score)
            settings["tuning"].setdefault("searched", {})[method.name] = search.as_json()
        else:
            method = default.fit(fit_set, fc) if default.requires_fit else default
        if fit_on:
            settings["fit_on"][method.name] = fit_on
            log.info("%s fitted on %s (%d samples)", method.name, fit_on, len(fit_set))
        settings["hyperparameters"][method.name] = method.hyperparameters()
        if method.fit_warnings:
            settings.setdefault("warnings", {})[method.name] = method.fit_warnings
        methods.append(method)
    settings["tuning"]["rule" if tune else "openood_would_tune"] = (
        SELECTION_RULE if tune else [m.name for m in defaults if m.openood_sweep]
    )

    id_test = cached_features(
        net, id_bundle.test_images, mean, std, key=f"{prefix}-test", labels=id_bundle.test_labels, **extract
    )
    finite_outputs(id_test, "ID test")
    ood = {
        name: finite_outputs(cached_features(net, images, mean, std, key=ood_keys[name], **extract), f"OOD set {name}")
        for name, images in ood_images.items()
    }
    check_ood_set_names(ood_images, "evaluate")
    # ID and OOD apart by structure: the OOD sets' names never reach the ID scores
    id_scores = {method.name: score(method, id_bundle.test_images, id_test) for method in methods}
    ood_scores = {
        method.name: {name: score(method, ood_images[name], ood[name]) for name in ood_images} for method in methods
    }
    rows = [
        row for method in methods for row in _metric_rows(method.name, id_scores[method.name], ood_scores[method.name])
    ]
    scores = {f"{method}/{ID_SET}": values for method, values in id_scores.items()}
    scores.update({f"{method}/{name}": values for method, sets in ood_scores.items() for name, values in sets.items()})
    return EvalResult(rows=rows, id_accuracy=accuracy(id_test.logits, id_test.labels), scores=scores, settings=settings)


@dataclass
class SetScorer:
    """(N,) scores of a postprocessor on one image set: from its cached features, or, for methods that
    need the network (`needs_network`), from their own batched pass over the images."""

    net: nn.Module
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    batch_size: int

    def __call__(self, method: Postprocessor, images: torch.Tensor | ImageSource, features: FeatureSet) -> np.ndarray:
        if method.needs_network:
            return network_scores(
                method, self.net, pixels(images), self.mean, self.std, device=self.device, batch_size=self.batch_size
            )
        return np.asarray(method.score(features), dtype=np.float64)


def _fitted(
    name: str, params: dict[str, Any], bundle: DataBundle, fit_set: FeatureSet | None, fc: Any
) -> Postprocessor:
    """Postprocessor `name` with `params`, given the ID normalisation and fitted on `fit_set` when it needs it."""
    method = _for_dataset(create_postprocessor(name, **params), bundle)
    return method.fit(fit_set, fc) if method.requires_fit else method


def _searched(
    name: str,
    sweep: dict[str, Any],
    bundle: DataBundle,
    fit_set: FeatureSet | None,
    fc: Any,
    val: dict[str, tuple[torch.Tensor, FeatureSet]],
    score: SetScorer,
) -> tuple[Postprocessor, SearchResult]:
    """OpenOOD's search for `name` on the validation split, and the postprocessor with the chosen values."""

    def val_scores(params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        method = _fitted(name, params, bundle, fit_set, fc)
        scores = score(method, *val["id"]), score(method, *val["ood"])
        for part, values in zip(("ID-val", "OOD-val"), scores):
            check_finite_scores(name, f"the {part} split", values)
        return scores

    search = search_openood(name, sweep, val_scores)
    log.info("%s: OpenOOD's search chose %s on the validation split", name, search.chosen)
    return _fitted(name, search.chosen, bundle, fit_set, fc), search


def _validation_features(
    net: nn.Module,
    validation: ValidationImages | None,
    mean: Sequence[float],
    std: Sequence[float],
    prefix: str,
    extract: dict[str, Any],
) -> dict[str, tuple[torch.Tensor, FeatureSet]]:
    """{"id": (images, cached features), "ood": (…)} for the validation images there are."""
    parts = {} if validation is None else {"id": validation.id_images, "ood": validation.ood_images}
    return {
        part: (
            images,
            finite_outputs(
                cached_features(net, images, mean, std, key=f"{prefix}-val-{part}", **extract), f"{part}-val"
            ),
        )
        for part, images in parts.items()
        if images is not None
    }


def _fit_on(method: Postprocessor, fit_sets: dict[str, FeatureSet]) -> str | None:
    """Which ID split `method` is fitted on: its `fit_split` when there is one, else ID-train (None: no fit)."""
    if not method.requires_fit:
        return None
    return "id_val" if method.fit_split == "val" and "id_val" in fit_sets else "id_train"


def _describe(validation: ValidationImages | None) -> dict[str, Any] | None:
    return None if validation is None else validation.describe()


def _for_dataset(method: Postprocessor, bundle: DataBundle) -> Postprocessor:
    """Give input-perturbing methods (ODIN's `input_std`) the ID normalisation, so their step is in pixel units."""
    if hasattr(method, "input_std"):
        method.input_std = tuple(float(s) for s in bundle.std)
    return method


def _transform_tag(bundle: DataBundle) -> str:
    """Image size and ID normalisation: the features change when either does."""
    stats = hashlib.sha256(repr((tuple(bundle.mean), tuple(bundle.std))).encode()).hexdigest()[:8]
    return f"s{bundle.image_size}-norm{stats}"


def _fit_features(
    net: nn.Module,
    bundle: DataBundle,
    fit_labels: str,
    noisy_train_labels: np.ndarray | None,
    fit_subset: int | None,
    prefix: str,
    extract: dict[str, Any],
) -> FeatureSet:
    """ID-train features with the labels chosen by `fit_labels`, on the optional fixed-seed subset."""
    n_train = len(bundle.train_labels)
    labels = _fit_label_source(fit_labels, noisy_train_labels, bundle.train_labels, n_train)
    images, key = bundle.train_images, f"{prefix}-train"
    if fit_subset is not None:
        if not 0 < fit_subset:
            raise UserError(f"fit_subset must be a positive number of images, got {fit_subset}")
        if fit_subset < n_train:
            picked = np.sort(np.random.default_rng(FIT_SUBSET_SEED).choice(n_train, fit_subset, replace=False))
            key = f"{key}-subset{fit_subset}"
            images = select(images, torch.from_numpy(picked), key)
            labels = labels[picked] if labels is not None else None
    train = finite_outputs(cached_features(net, images, bundle.mean, bundle.std, key=key, **extract), "ID train")
    train.labels = train.logits.argmax(axis=1).astype(np.int64) if labels is None else labels
    return train


def _fit_label_source(fit_labels: str, noisy: np.ndarray | None, clean: np.ndarray, n_train: int) -> np.ndarray | None:
    """The fitting labels for the whole training split, or None for "pred" (known only after the pass)."""
    if fit_labels not in FIT_LABELS:
        raise UserError(f"fit_labels must be one of {', '.join(FIT_LABELS)}, got {fit_labels!r}")
    if fit_labels == "pred":
        return None
    if fit_labels == "clean":
        return np.asarray(clean, dtype=np.int64)
    if noisy is None:
        raise UserError("fit_labels='noisy' needs the run's noisy training labels (noise.npz in the run folder)")
    if len(noisy) != n_train:
        raise UserError(
            f"the noisy labels hold {len(noisy)} entries but the training split has {n_train} images; "
            "use the noise.npz of the run this checkpoint came from"
        )
    return np.asarray(noisy, dtype=np.int64)


def network_scores(
    method: Postprocessor,
    net: nn.Module,
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device,
    batch_size: int,
) -> np.ndarray:
    """(N,) scores of a `needs_network` postprocessor: its own batched pass, `method.score_batch(net, x)`.

    No `no_grad` here: such methods (ODIN) differentiate with respect to the input themselves.
    """
    mean_t, std_t = channel_stats(mean, std, device)
    parts = [
        method.score_batch(net, normalise_batch(images_uint8[s : s + batch_size].to(device), mean_t, std_t))
        .detach()
        .double()
        .cpu()
        for s in batches(len(images_uint8), batch_size)
    ]
    return torch.cat(parts).numpy()


NON_FINITE_CAUSES = (
    "the network's weights (NaN or inf), its BatchNorm statistics (a negative running_var) or the input "
    "normalisation (--mean/--std: a tiny --std overflows)"
)


OUTPUT_LIMIT = 1e17  # |logit| and |feature| beyond which float32 distances and covariances (sums of squares) overflow


def finite_outputs(outputs: FeatureSet, set_name: str) -> FeatureSet:
    """The network's outputs on one set, after a one-line error naming the likely cause if any is NaN or inf, or so
    large (OUTPUT_LIMIT) that a postprocessor's float32 arithmetic would turn it into inf (checked before a
    postprocessor is fitted on them or scores them)."""
    for what, values in (("logits", outputs.logits), ("features", outputs.features)):
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise UserError(
                f"the network's {what} on {set_name} hold {bad} NaN/inf value(s) of {values.size}; check "
                f"{NON_FINITE_CAUSES}"
            )
        largest = float(np.abs(values).max()) if values.size else 0.0
        if largest > OUTPUT_LIMIT:
            raise UserError(
                f"the network's {what} on {set_name} reach {largest:.3g}, beyond {OUTPUT_LIMIT:.0e} (where float32 "
                f"distances overflow); check {NON_FINITE_CAUSES}"
            )
    return outputs


def check_finite_scores(method: str, set_name: str, scores: Any) -> None:
    """A one-line error naming the likely cause when a postprocessor's scores on one set are not all finite (no
    AUROC is computed from them)."""
    values = np.asarray(scores, dtype=np.float64)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise UserError(
            f"{method} gave {bad} NaN/inf score(s) of {values.size} on {set_name}: the network's outputs are not "
            f"finite there; check {NON_FINITE_CAUSES}"
        )


def _metric_rows(method: str, id_scores: np.ndarray, ood_scores: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per OOD set, then the mean row (per-metric mean over sets)."""
    check_finite_scores(method, "the ID test set", id_scores)
    rows = []
    for name, scores in ood_scores.items():
        check_finite_scores(method, f"OOD set {name}", scores)
        values = ood_metrics(id_scores, scores)
        rows.append({"postprocessor": method, "ood": name, **{k: float(values[k]) for k in METRIC_KEYS}})
    mean = {k: float(np.mean([row[k] for row in rows])) for k in METRIC_KEYS}
    return [*rows, {"postprocessor": method, "ood": MEAN_ROW, **mean}]


# ---------------------------------------------------------------------------------------------- outputs


EVAL_FILES = ("scores.npz", "eval.csv", "eval.md")  # written before eval.json, which records their sha256


def write_eval_outputs(result: EvalResult, out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write scores.npz, eval.csv, eval.md and, last, eval.json ({**meta, id_accuracy, results: rows, files}),
    each atomically. One unit: eval.json's "files" holds the sha256 of the other three, so an evaluation that
    fails part-way leaves the previous eval.json with hashes that no longer match, which `report` refuses.

    Returns the eval.json content.
    """
    out_dir = Path(out_dir)
    scores = io.BytesIO()
    np.savez(scores, **result.scores)
    parts = {
        "scores.npz": scores.getvalue(),
        "eval.csv": rows_to_csv(result.rows).encode("utf-8"),
        "eval.md": (f"ID accuracy: {result.id_accuracy:.2f}%\n\n{format_markdown_table(result.rows)}\n").encode(
            "utf-8"
        ),
    }
    for name in EVAL_FILES:
        atomic_write(out_dir / name, lambda f, data=parts[name]: f.write(data))
    report = {
        **meta,
        "id_accuracy": float(result.id_accuracy),
        "results": result.rows,
        "files": {name: hashlib.sha256(parts[name]).hexdigest() for name in EVAL_FILES},
    }
    atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    return report


def _json_default(value: Any) -> Any:
    """Paths, numpy scalars and arrays in the meta dict become JSON values."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text with the header ROW_KEYS and one line per row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_KEYS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_markdown_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per postprocessor, one column per OOD set (first-seen order, mean last),
    cells "AUROC / FPR95"."""
    sets = list(dict.fromkeys(row["ood"] for row in rows if row["ood"] != MEAN_ROW))
    if any(row["ood"] == MEAN_ROW for row in rows):
        sets.append(MEAN_ROW)
    cells = {(row["postprocessor"], row["ood"]): f"{row['auroc']:.2f} / {row['fpr95']:.2f}" for row in rows}
    methods = list(dict.fromkeys(row["postprocessor"] for row in rows))
    lines = ["| postprocessor (AUROC / FPR95) | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    lines += [f"| {m} | " + " | ".join(cells.get((m, s), "–") for s in sets) + " |" for m in methods]
    return "\n".join(lines)
