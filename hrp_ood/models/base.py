"""The network contract every backbone follows (SPEC §4) and the model registry (timm style).

A backbone only says how to compute its stages, `forward_stages(x)` (the unpooled feature maps, stem
first); this base class turns them into everything OpenOOD's postprocessors call:

    stages        s_0, …, s_{L-1}                     (N, C_l, H_l, W_l)
    feature list  [s_0, …, s_{L-2}, pool(s_{L-1})]    last entry (N, D, 1, 1), as OpenOOD's ResNet18_32x32
    feature       h = flatten(pool(s_{L-1}))          (N, D)  the penultimate feature
    logits        z = W h + b                         (N, C)  `fc`
    ReAct         z = W min(h, c) + b                 `forward_threshold(x, c)`

`pool` is global average pooling, so every backbone takes 32×32 and 64×64 inputs alike.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import Callable, Iterator

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from hrp_ood.errors import UserError

ModelFactory = Callable[..., "ClassifierNet"]
_MODEL_REGISTRY: dict[str, ModelFactory] = {}


class ClassifierNet(nn.Module, abc.ABC):
    """Base class of every backbone: a feature extractor g followed by a linear head `fc` (f = fc ∘ g).

    Subclasses set `self.fc` (an `nn.Linear(num_features, num_classes)`) and `self.num_features`, and
    implement `forward_stages`.
    """

    fc: nn.Linear
    num_features: int

    @abc.abstractmethod
    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The unpooled feature maps of the backbone's stages, stem first, last stage last."""

    @property
    def num_classes(self) -> int:
        return self.get_fc_layer().out_features

    def forward_feature_list(self, x: Tensor) -> list[Tensor]:
        """OpenOOD's `return_feature_list`: every stage map, the last one globally average-pooled to (N, D, 1, 1)."""
        stages = self.forward_stages(x)
        return stages[:-1] + [F.adaptive_avg_pool2d(stages[-1], 1)]

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate feature h (N, num_features), after global pooling."""
        return self.forward_feature_list(x)[-1].flatten(1)

    def classify(self, features: Tensor) -> Tensor:
        """Logits z = W h + b from penultimate features."""
        return self.fc(features)

    def forward(
        self, x: Tensor, return_feature: bool = False, return_feature_list: bool = False
    ) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, list[Tensor]]:
        """logits, or (logits, feature) if `return_feature`, else (logits, feature_list) if
        `return_feature_list` — the precedence of OpenOOD's ResNet18_32x32.forward."""
        feature_list = self.forward_feature_list(x)
        feature = feature_list[-1].flatten(1)
        logits = self.classify(feature)
        if return_feature:
            return logits, feature
        if return_feature_list:
            return logits, feature_list
        return logits

    def forward_threshold(self, x: Tensor, threshold: float) -> Tensor:
        """ReAct (Sun et al., 2021): logits W min(h, c) + b with the feature clipped from above at c."""
        return self.classify(self.forward_features(x).clip(max=threshold))

    def intermediate_forward(self, x: Tensor, layer_index: int) -> Tensor:
        """OpenOOD's `intermediate_forward`: the unpooled output of stage `layer_index` (1 = first after the stem)."""
        stages = self.forward_stages(x)
        if not 1 <= layer_index < len(stages):
            raise ValueError(f"layer_index must be in 1..{len(stages) - 1}, got {layer_index}")
        return stages[layer_index]

    def get_fc(self) -> tuple[np.ndarray, np.ndarray]:
        """(W (C, D), b (C,)) of the linear head as numpy arrays (OpenOOD's `get_fc`)."""
        fc = self.get_fc_layer()
        return fc.weight.detach().cpu().numpy(), fc.bias.detach().cpu().numpy()

    def get_fc_layer(self) -> nn.Linear:
        return self.fc


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding a factory `fn(num_classes, **kwargs) -> ClassifierNet` to the registry under `name`."""

    def add(factory: ModelFactory) -> ModelFactory:
        if name in _MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _MODEL_REGISTRY[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    return sorted(_MODEL_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs) -> ClassifierNet:
    """Build a registered backbone; bad names or arguments raise `UserError`."""
    if name not in _MODEL_REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    factory = _MODEL_REGISTRY[name]
    try:
        inspect.signature(factory).bind(num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise UserError(
            f"model {name!r} does not accept these arguments ({err}); its signature is {inspect.signature(factory)}"
        ) from None
    return factory(num_classes=num_classes, **kwargs)


def unwrap_model(net: nn.Module) -> nn.Module:
    """The bare network inside DataParallel / DistributedDataParallel (`.module`) or torch.compile (`._orig_mod`)."""
    for attribute in ("module", "_orig_mod"):
        inner = getattr(net, attribute, None)
        if isinstance(inner, nn.Module):
            return unwrap_model(inner)
    return net


def export_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """A plain CPU state dict of the unwrapped network: no `module.` / `_orig_mod.` prefixes."""
    return {key: value.detach().cpu().clone() for key, value in unwrap_model(net).state_dict().items()}


@contextlib.contextmanager
def frozen_batchnorm_stats(net: nn.Module) -> Iterator[nn.Module]:
    """BatchNorm layers keep normalising with batch statistics in train mode but stop updating their running
    mean/var inside the block.

    torch.func transforms (`jvp`, `grad` over `functional_call`) refuse the in-place running-stat update of a
    train-mode BatchNorm ("attempted to call in-place operation ... that would mutate a captured Tensor"); the
    virtual step of Eq. 2 must not move the running statistics either.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False  # F.batch_norm then receives no running buffers in train mode
    try:
        yield net
    finally:
        for norm in norms:
            norm.track_running_stats = True
