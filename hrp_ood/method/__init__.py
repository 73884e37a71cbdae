"""The HRP method's maths (SPEC §3): reliabilities (and `ReliabilityMemory`, the one stateful piece: a per-sample
average across visits), RAM/GRG, CDCL, targets, schedules; everything else is a pure function of tensors."""

from hrp_ood.method.cdcl import cdcl_loss, normalize_beta
from hrp_ood.method.ram import MixedBatch, ram_beta_params, ram_loss, reliability_mixup, total_reliability
from hrp_ood.method.reliability import (
    Reliabilities,
    ReliabilityMemory,
    meta_reliabilities,
    normalize_reliabilities,
    reliabilities_from_signed,
)
from hrp_ood.method.schedule import coteaching_forget_rate, ramp_weight
from hrp_ood.method.targets import (
    consistency_loss,
    coteaching_select,
    gce_loss,
    prior_penalty,
    refine_targets,
    reweighted_ce,
    sharpen,
    soft_cross_entropy,
    weighted_label_ce,
)

__all__ = [
    "MixedBatch",
    "Reliabilities",
    "ReliabilityMemory",
    "cdcl_loss",
    "consistency_loss",
    "coteaching_forget_rate",
    "coteaching_select",
    "gce_loss",
    "meta_reliabilities",
    "normalize_beta",
    "normalize_reliabilities",
    "ram_beta_params",
    "ram_loss",
    "ramp_weight",
    "prior_penalty",
    "refine_targets",
    "reliabilities_from_signed",
    "reliability_mixup",
    "reweighted_ce",
    "sharpen",
    "soft_cross_entropy",
    "total_reliability",
    "weighted_label_ce",
]
