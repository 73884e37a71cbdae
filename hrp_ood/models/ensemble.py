"""The ensemble of co-trained networks as one network of the same contract (SPEC §4).

Averaging k members' logits is a linear head over their concatenated features:

    (1/k) Σ_m (W_m h_m + b_m) = [W_1 … W_k]/k · [h_1; …; h_k] + (1/k) Σ_m b_m

so the ensemble's feature is h = [h_1; …; h_k] (D = Σ D_m), its head is W = [W_1 … W_k]/k, b = mean(b_m), and
ReAct's min(h, c) clips every member's feature at c. Summed logits (DivideMix's, UNICON's and LongReMix's test) are
the same head without the 1/k: `combine="sum"`. Feature-based postprocessors (Mahalanobis, ReAct, ViM …)
then see the ensemble exactly as they see a single network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrp_ood.errors import UserError
from hrp_ood.models.base import ClassifierNet

COMBINE_RULES = ("mean", "sum")


class EnsembleNet(ClassifierNet):
    """Members' logits averaged; features, stages and the linear head concatenated.

    `fc` is not a stored layer: each access builds a fresh `nn.Linear` from the members' current heads (a
    detached copy), so it never goes stale and the ensemble's state dict and parameters are exactly the
    members'. `forward` applies the same W, b without detaching, so gradients reach every member.

    Stage maps are concatenated along channels, so members need the same stage layout (same number of stages
    and spatial sizes) — always true for HRP's two co-trained copies of one backbone.
    """

    def __init__(self, nets: Sequence[ClassifierNet], combine: str = "mean") -> None:
        super().__init__()
        if combine not in COMBINE_RULES:
            raise UserError(f"an ensemble combines logits by {' or '.join(COMBINE_RULES)}, got {combine!r}")
        self.combine = combine
        if len(nets) == 0:
            raise UserError("EnsembleNet needs at least one network")
        class_counts = {net.num_classes for net in nets}
        if len(class_counts) > 1:
            raise UserError(
                f"ensemble members disagree on the number of classes ({sorted(class_counts)}); "
                "combine networks trained on the same dataset"
            )
        self.members = nn.ModuleList(nets)
        self.num_features = sum(net.num_features for net in nets)

    def head_parameters(self) -> tuple[Tensor, Tensor]:
        """W = [W_1 … W_k]/k (C, Σ D_m) and b = (1/k) Σ b_m (C,), differentiable w.r.t. the members; without the
        1/k when the ensemble sums its members' logits."""
        heads = [net.get_fc_layer() for net in self.members]
        scale = 1.0 if self.combine == "sum" else 1.0 / len(heads)
        weight = torch.cat([head.weight for head in heads], dim=1) * scale
        bias = torch.stack([head.bias for head in heads]).sum(dim=0) * scale
        return weight, bias

    @property
    def fc(self) -> nn.Linear:  # type: ignore[override]
        weight, bias = self.head_parameters()
        layer = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        return layer

    def classify(self, features: Tensor) -> Tensor:
        return F.linear(features, *self.head_parameters())

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        member_stages = [net.forward_stages(x) for net in self.members]
        if len({len(stages) for stages in member_stages}) > 1:
            raise UserError("ensemble members have different numbers of stages; ensemble copies of one backbone")
        return [torch.cat(maps, dim=1) for maps in zip(*member_stages)]
