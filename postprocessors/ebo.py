"""Energy-based OOD score (EBO)."""

from __future__ import annotations

import torch

from hrp_ood.errors import UserError

from .base import Postprocessor, register_postprocessor


@register_postprocessor("ebo")
class EnergyBased(Postprocessor):
    """Score = negative free energy, T · logsumexp(z / T) (OpenOOD default T = 1).

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020,
    https://arxiv.org/abs/2010.03759 (OpenOOD: ``ebo``).
    """

    # OpenOOD v1.5 configs/postprocessors/ebo.yml lists temperature_list [1, 10, 100, 1000] but sets
    # APS_mode False: OpenOOD scores T = 1 without a search.
    openood_sweep = {}

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise UserError(f"ebo temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @staticmethod
    def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """s(x) = −E(x; T) = T · log Σ_c exp(z_c / T)."""
        return temperature * torch.logsumexp(logits / temperature, dim=1)

    def score_tensors(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.energy_score(logits, self.temperature)
