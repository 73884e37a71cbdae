"""ODIN: temperature scaling and input perturbation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hrp_ood.errors import UserError

from .base import Postprocessor, register_postprocessor
from .msp import MaxSoftmax

# OpenOOD's fallback when the dataset's normalisation is unknown; pass the ID normalisation std
# (e.g. CIFAR-10 (0.2470, 0.2435, 0.2616)) so the step is `noise` in *pixel* units, as ODIN intends.
DEFAULT_INPUT_STD = (0.5, 0.5, 0.5)


@register_postprocessor("odin")
class ODIN(Postprocessor):
    """Score = max_c softmax(z(x̃) / T)_c with x̃ = x − ε · sign(−∇ₓ log S_ŷ(x; T)) / σ.

    Liang et al., "Enhancing The Reliability of Out-of-distribution Image Detection in Neural
    Networks", ICLR 2018, https://arxiv.org/abs/1706.02690 (OpenOOD: ``odin``, T = 1000,
    ε = 0.0014). As in OpenOOD, the gradient is that of the cross-entropy of z(x)/T against the
    predicted class ŷ, its sign maps 0 to +1, each channel is divided by the input
    normalisation std σ, and the prediction is the argmax of the perturbed logits.

    With ε = 0 the perturbation vanishes and the score is computed from cached logits
    (``needs_network`` is False); with ε > 0 it needs the network (``score_batch``).
    """

    # OpenOOD v1.5 configs/postprocessors/odin.yml (APS_mode True): sweep keys `temperature` [1, 10, 100, 1000]
    # and `noise` [0.0014, 0.0028], in that order (set_hyperparam takes [temperature, noise]).
    openood_sweep = {"temperature": (1, 10, 100, 1000), "noise": (0.0014, 0.0028)}

    def __init__(
        self, temperature: float = 1000.0, noise: float = 0.0014, input_std: Sequence[float] = DEFAULT_INPUT_STD
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise UserError(f"odin temperature must be > 0, got {temperature}")
        if not noise >= 0:
            raise UserError(f"odin noise must be >= 0, got {noise}")
        self.temperature = float(temperature)
        self.noise = float(noise)
        self.input_std = tuple(float(s) for s in input_std)
        self.needs_network = self.noise > 0

    @staticmethod
    def tempered_softmax_score(logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """S(x; T) = max_c exp(z_c / T) / Σ_k exp(z_k / T)."""
        return MaxSoftmax.msp_score(logits / temperature)

    def perturb(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x̃ = x − ε · sign(∇ₓ CE(z(x)/T, ŷ)) / σ, with sign(0) = +1 (OpenOOD's ``torch.ge(grad, 0)``)."""
        std = torch.tensor(self.input_std, dtype=x.dtype, device=x.device)
        if x.dim() < 2 or x.shape[1] != std.numel():
            raise ValueError(f"odin input_std has {std.numel()} channels but the input has shape {tuple(x.shape)}")
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = net(x)
            loss = F.cross_entropy(logits / self.temperature, logits.detach().argmax(dim=1))
            (grad,) = torch.autograd.grad(loss, x)
        direction = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)
        return x.detach() - self.noise * direction / std.view(1, -1, *([1] * (x.dim() - 2)))

    def postprocess(self, net: nn.Module, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.needs_network:
            return super().postprocess(net, data)
        with torch.no_grad():
            logits = net(self.perturb(net, data))
        return logits.argmax(dim=1), self.tempered_softmax_score(logits, self.temperature)

    def score_tensors(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.tempered_softmax_score(logits, self.temperature)
