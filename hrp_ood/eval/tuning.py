"""OpenOOD v1.5's automatic parameter search (APS): its grids, its enumeration order, its selection rule.

OpenOOD's ``Evaluator.hyperparam_search`` (``openood/evaluation_api/evaluator.py``, what its
``scripts/eval_ood.py`` runs) tries every combination of a postprocessor's ``postprocessor_sweep``
lists (the grids are ``Postprocessor.openood_sweep``), scores ID-val against OOD-val with each, and
keeps one:

* the combinations come from its ``recursive_generator``: the *first* parameter varies fastest
  (ODIN: (T=1, ε=0.0014), (T=10, ε=0.0014), …, (T=1000, ε=0.0014), (T=1, ε=0.0028), …);
* a combination is kept when ``auroc > max_auroc`` (AUROC as a fraction, ``compute_all_metrics()[1]``,
  ``max_auroc`` starting at 0): the first of the best, so ties keep the earliest combination.
  (OpenOOD's older training-pipeline ``OODEvaluator.hyperparam_search`` keeps the *last* of tied
  combinations; the Evaluator's rule is the one followed here.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hrp_ood.errors import UserError
from hrp_ood.eval.metrics import auroc_fraction

SELECTION_RULE = (
    "OpenOOD v1.5 Evaluator.hyperparam_search: every combination of the grid (first parameter "
    "fastest), AUROC of ID-val vs OOD-val, the first combination with the highest AUROC"
)

# (ID-val scores, OOD-val scores) of one candidate setting
Scorer = Callable[[dict[str, Any]], tuple[np.ndarray, np.ndarray]]


def openood_candidates(sweep: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of `sweep`'s values, in the order of OpenOOD's ``recursive_generator``.

    The last parameter is the outer loop, so the first one varies fastest.
    """
    candidates: list[dict[str, Any]] = [{}]
    for name, values in sweep.items():
        candidates = [{**earlier, name: value} for value in values for earlier in candidates]
    return candidates


def openood_choice(aurocs: Sequence[float]) -> int:
    """Index OpenOOD keeps: the first strictly better AUROC, from 0 up (ties keep the earliest).

    Were every AUROC 0, OpenOOD's loop would keep none and fail; the first is kept here.
    """
    best_index, best = 0, 0.0
    for index, auroc in enumerate(aurocs):
        if auroc > best:
            best_index, best = index, auroc
    return best_index


@dataclass
class SearchResult:
    """What the search tried and kept: `candidates` holds {"params", "val_auroc" (×100)} or {"params", "skipped"}."""

    postprocessor: str
    chosen: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "candidates": self.candidates}


def search_openood(name: str, sweep: Mapping[str, Sequence[Any]], score: Scorer) -> SearchResult:
    """Run OpenOOD's search over `sweep` with `score(params) -> (id_val_scores, ood_val_scores)`.

    A setting the data cannot take (`score` raises UserError, e.g. KNN's K above the number of ID-train
    samples) is recorded as skipped. OpenOOD would still run it (faiss pads missing neighbours with the
    largest float, so every sample gets the same score and an AUROC of 0.5); skipping differs from
    OpenOOD only when every valid setting scores below 0.5.
    """
    tried, aurocs, records = [], [], []
    for params in openood_candidates(sweep):
        try:
            id_scores, ood_scores = score(params)
        except UserError as err:
            records.append({"params": params, "skipped": str(err)})
            continue
        auroc = auroc_fraction(id_scores, ood_scores)
        tried.append(params)
        aurocs.append(auroc)
        records.append({"params": params, "val_auroc": 100.0 * auroc})
    if not tried:
        raise UserError(
            f"no setting of {name}'s OpenOOD search grid {dict(sweep)} fits this data "
            f"({records[0]['skipped']}); run without --tune"
        )
    return SearchResult(name, tried[openood_choice(aurocs)], records)
