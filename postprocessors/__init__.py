"""OOD postprocessors (``hrp_ood.postprocessors``, SPEC §4): one method per file, a small registry.

    from hrp_ood.postprocessors import create_postprocessor, list_postprocessors
    mds = create_postprocessor("mds").fit(train_features, net.get_fc())
    scores = mds.score(test_features)          # higher = more in-distribution

Scores follow the sign convention of :mod:`hrp_ood.eval.metrics`.
"""

from __future__ import annotations

from .base import (
    Postprocessor,
    create_postprocessor,
    extract_featureset,
    list_postprocessors,
    register_postprocessor,
)
from .ebo import EnergyBased
from .knn import KNN
from .maxlogit import MaxLogit
from .mds import Mahalanobis
from .msp import MaxSoftmax
from .odin import ODIN
from .openood_adapter import create_openood_postprocessor, openood_available
from .react import ReAct
from .vim import ViM

__all__ = [
    "KNN",
    "ODIN",
    "EnergyBased",
    "Mahalanobis",
    "MaxLogit",
    "MaxSoftmax",
    "Postprocessor",
    "ReAct",
    "ViM",
    "create_openood_postprocessor",
    "create_postprocessor",
    "extract_featureset",
    "list_postprocessors",
    "openood_available",
    "register_postprocessor",
]
