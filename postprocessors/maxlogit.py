"""Maximum logit (MLS)."""

from __future__ import annotations

import torch

from .base import Postprocessor, register_postprocessor


@register_postprocessor("maxlogit")
class MaxLogit(Postprocessor):
    """Score = max_c z_c (the unnormalised logit, so confidence is not squashed by the softmax).

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022,
    https://arxiv.org/abs/1911.11132 (OpenOOD: ``mls``).
    """

    @staticmethod
    def max_logit_score(logits: torch.Tensor) -> torch.Tensor:
        """s(x) = max_c z_c."""
        return logits.max(dim=1).values

    def score_tensors(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.max_logit_score(logits)
