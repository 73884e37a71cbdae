"""What one pass of a network over a dataset leaves behind: every postprocessor reads this."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FeatureSet:
    """Cached network outputs for one dataset.

    logits: (N, C) float32; features: (N, D) float32 penultimate features;
    labels: (N,) int64 class labels when known (ID data), else None (OOD data).
    """

    logits: np.ndarray
    features: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.logits)
