"""Projection head for Consensus-Driven Contrastive Learning (SPEC §3.3)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """SupCon's MLP projection: z = normalize(W2 relu(W1 h + b1) + b2), ‖z‖₂ = 1, the z of Eq. 12."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, features: Tensor) -> Tensor:
        """(N, in_dim) backbone features → (N, out_dim) unit-norm embeddings."""
        return F.normalize(self.mlp(features), dim=1)
