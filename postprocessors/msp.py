"""Maximum softmax probability (MSP), the baseline of OOD detection."""

from __future__ import annotations

import torch

from .base import Postprocessor, register_postprocessor


@register_postprocessor("msp")
class MaxSoftmax(Postprocessor):
    """Score = max_c softmax(z)_c.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples
    in Neural Networks", ICLR 2017, https://arxiv.org/abs/1610.02136 (OpenOOD: ``msp``,
    ``BasePostprocessor``).
    """

    @staticmethod
    def msp_score(logits: torch.Tensor) -> torch.Tensor:
        """s(x) = max_c exp(z_c) / Σ_k exp(z_k)."""
        return torch.softmax(logits, dim=1).max(dim=1).values

    def score_tensors(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.msp_score(logits)
