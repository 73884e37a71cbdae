"""ReAct: rectified activations, then the energy score."""

from __future__ import annotations

import numpy as np
import torch
from hrp_ood.postprocessors.featureset import FeatureSet

from hrp_ood.errors import UserError

from .base import Postprocessor, register_postprocessor
from .ebo import EnergyBased


@register_postprocessor("react")
class ReAct(Postprocessor):
    """Score = logsumexp(W · min(f, c) + b), c = the `percentile`-th percentile of ID activations.

    Sun et al., "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021,
    https://arxiv.org/abs/2111.12797 (OpenOOD: ``react``, percentile 90, energy with T = 1; the
    clipping is the network's ``forward_threshold``, i.e. ``fc(feature.clip(max=c))``).

    OpenOOD v1.5 takes the percentile over its ID *validation* features (``ReactPostprocessor.setup``
    reads ``id_loader_dict['val']``), hence ``fit_split = "val"``: the evaluation fits on ID-val when
    it has a validation split and on ID-train otherwise; ``fit`` uses whatever it receives. The
    reported prediction is the argmax of the clipped logits, as in OpenOOD.
    """

    requires_fit = True
    uses_features = True
    fit_split = "val"
    # OpenOOD v1.5 configs/postprocessors/react.yml (APS_mode True): percentile_list [85, 90, 95, 99];
    # its set_hyperparam recomputes the threshold on the ID-val activations for each candidate.
    openood_sweep = {"percentile": (85, 90, 95, 99)}

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        if not 0.0 < percentile <= 100.0:
            raise UserError(f"react percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)

    def _fit(self, train: FeatureSet, weight: np.ndarray, bias: np.ndarray) -> None:
        self.threshold = float(np.percentile(np.asarray(train.features).reshape(-1), self.percentile))
        self.weight = torch.from_numpy(weight)
        self.bias = torch.from_numpy(bias)

    @staticmethod
    def clipped_logits(
        features: torch.Tensor, threshold: float, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """z̄ = W · min(f, c) + b (activations clipped from above only)."""
        return features.clamp(max=threshold) @ weight.T + bias

    @staticmethod
    def react_score(features: torch.Tensor, threshold: float, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """s(f) = log Σ_c exp(z̄_c)."""
        return EnergyBased.energy_score(ReAct.clipped_logits(features, threshold, weight, bias))

    def _fc(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_features(features)
        return self._fitted("weight", features), self._fitted("bias", features)

    def score_tensors(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.react_score(features, self.threshold, *self._fc(features))

    def predict_tensors(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.clipped_logits(features, self.threshold, *self._fc(features)).argmax(dim=1)
