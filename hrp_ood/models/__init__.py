"""Backbones behind one contract (SPEC §4), a timm-style registry, the CDCL projection head and the ensemble.

create_model("preact_resnet18", num_classes=10)   # see list_models()
"""

from hrp_ood.models import preact_resnet, resnet_openood, small_cnn, vgg  # noqa: F401 (fill the registry)
from hrp_ood.models.base import (
    ClassifierNet,
    create_model,
    export_state_dict,
    frozen_batchnorm_stats,
    list_models,
    register_model,
)
from hrp_ood.models.ensemble import EnsembleNet
from hrp_ood.models.heads import ProjectionHead

__all__ = [
    "ClassifierNet",
    "EnsembleNet",
    "ProjectionHead",
    "create_model",
    "export_state_dict",
    "frozen_batchnorm_stats",
    "list_models",
    "register_model",
]
