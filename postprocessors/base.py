"""The postprocessor base class and its registry.

A postprocessor turns a network's outputs into one OOD score per sample, "higher = more
in-distribution" (the sign convention is fixed in :mod:`hrp_ood.eval.metrics`). Fitting is
separate from scoring and both work on cached outputs (:class:`FeatureSet`), so features are
extracted once and every method reuses them (the pytorch-ood ``Detector`` design). The same
objects also speak OpenOOD v1.5's ``BasePostprocessor`` interface (``setup`` / ``postprocess``
/ ``inference``), so they drop into OpenOOD's evaluator unchanged.
"""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from hrp_ood.postprocessors.featureset import FeatureSet
from torch import nn
from tqdm import tqdm

from hrp_ood.errors import UserError

log = logging.getLogger(__name__)

Fc = tuple[np.ndarray, np.ndarray]

_REGISTRY: dict[str, type[Postprocessor]] = {}


class Postprocessor(abc.ABC):
    """Base class: subclasses implement :meth:`score_tensors` (and :meth:`_fit` when ``requires_fit``).

    Class attributes:
        name: registry name (set by :func:`register_postprocessor`).
        requires_fit: the method needs ID-train statistics (call :meth:`fit` or :meth:`setup`).
        needs_network: the score needs the network itself (input gradients), not cached outputs.
        uses_features: the score reads penultimate features (else logits only), so the OpenOOD
            path calls ``net(x, return_feature=True)``.
        fit_split: the ID split OpenOOD fits the method on: "train" (``id_loader_dict['train']``) or
            "val" (``id_loader_dict['val']``, ReAct); the evaluation falls back to train without a val split.
        openood_sweep: OpenOOD v1.5's automatic parameter search for the method, constructor argument →
            candidate values in the order of ``postprocessor_sweep`` in OpenOOD's
            ``configs/postprocessors/<name>.yml`` (searched when that file sets ``APS_mode: True``). Empty
            when OpenOOD's search does not change the method's scores; each file says why.
    """

    name: str = ""
    requires_fit: bool = False
    needs_network: bool = False
    uses_features: bool = False
    fit_split: ClassVar[str] = "train"
    openood_sweep: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(self) -> None:
        self.is_fitted = False
        self.fit_warnings: list[str] = []  # what the fit found doubtful (logged; eval.json's "warnings")
        self.feature_dim: int | None = None

    # ---- fit / score on cached outputs (the hrp-ood path) --------------------------------------------

    def fit(self, train: FeatureSet, fc: Fc) -> Postprocessor:
        """Estimate the method's ID statistics from ID-train outputs; fc = (W (C, D), b (C,)). Returns self."""
        if self.requires_fit:
            weight, bias = _check_fc(fc, train.features.shape[1])
            self.fit_warnings = []
            self._fit(train, weight, bias)
            self.feature_dim = train.features.shape[1]
        self.is_fitted = True
        return self

    def score(self, data: FeatureSet) -> np.ndarray:
        """(N,) scores, higher = more in-distribution, from cached logits/features."""
        if self.needs_network:
            raise ValueError(
                f"{self.name} with these settings perturbs the input and needs the network: "
                "use score_batch(net, x), postprocess or inference instead of score(FeatureSet)"
            )
        logits = torch.from_numpy(np.ascontiguousarray(data.logits))
        features = torch.from_numpy(np.ascontiguousarray(data.features))
        with torch.no_grad():
            return self.score_tensors(logits, features).cpu().numpy()

    @abc.abstractmethod
    def score_tensors(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(N,) scores from (N, C) logits and (N, D) features; the result lives on their device."""

    def predict_tensors(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Class predictions reported next to the scores (OpenOOD's ``pred``): argmax of the logits."""
        return logits.argmax(dim=1)

    def score_batch(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N,) scores of one input batch computed with the network (methods with ``needs_network``)."""
        return self.postprocess(net, x)[1]

    def _fit(self, train: FeatureSet, weight: np.ndarray, bias: np.ndarray) -> None:
        """Estimate the ID statistics (methods with ``requires_fit`` override this)."""

    # ---- OpenOOD's BasePostprocessor interface ---------------------------------------------------------

    def setup(self, net: nn.Module, id_loader_dict: Mapping[str, Iterable], ood_loader_dict: Any = None) -> None:
        """OpenOOD hook: extract ID-train outputs with `net` (``id_loader_dict['train']``) and fit, once."""
        if not self.requires_fit or self.is_fitted:
            return
        if "train" not in id_loader_dict:
            raise ValueError(f"{self.name} needs id_loader_dict['train'] (ID training data) to fit")
        train = extract_featureset(net, id_loader_dict["train"], progress=False)
        weight, bias = net.get_fc()
        self.fit(train, (_numpy(weight), _numpy(bias)))

    @torch.no_grad()
    def postprocess(self, net: nn.Module, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenOOD hook: (pred, conf) tensors for one batch, on the batch's device."""
        self._check_ready()
        logits, features = forward_outputs(net, data, self.uses_features)
        return self.predict_tensors(logits, features), self.score_tensors(logits, features)

    def inference(
        self, net: nn.Module, data_loader: Iterable, progress: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """OpenOOD hook: (pred, conf, label) numpy arrays over a loader of {"data", "label"} batches."""
        device = _device_of(net)
        preds, confs, labels = [], [], []
        for batch in tqdm(data_loader, disable=not progress, desc=f"{self.name}: "):
            pred, conf = self.postprocess(net, batch["data"].to(device))
            preds.append(pred.cpu())
            confs.append(conf.cpu())
            labels.append(torch.as_tensor(batch["label"]).cpu())
        return (torch.cat(preds).numpy().astype(int), torch.cat(confs).numpy(), torch.cat(labels).numpy().astype(int))

    # ---- helpers for subclasses ----------------------------------------------------------------------

    def _check_ready(self) -> None:
        if self.requires_fit and not self.is_fitted:
            raise RuntimeError(
                f"{self.name} must be fitted on ID-train outputs first: "
                "call fit(train, fc) or setup(net, id_loader_dict, ood_loader_dict)"
            )

    def _check_features(self, features: torch.Tensor) -> None:
        self._check_ready()
        if self.feature_dim is not None and features.shape[1] != self.feature_dim:
            raise ValueError(f"{self.name} was fitted on {self.feature_dim}-d features, got {features.shape[1]}-d")

    def _fitted(self, attribute: str, like: torch.Tensor) -> torch.Tensor:
        """Fitted tensor `attribute`, moved to `like`'s device and dtype (once: the copy is kept)."""
        value = getattr(self, attribute)
        if value.device != like.device or value.dtype != like.dtype:
            value = value.to(device=like.device, dtype=like.dtype)
            setattr(self, attribute, value)
        return value

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments and their current values (after fit: e.g. ViM's resolved ``dim``)."""
        return {k: getattr(self, k) for k in inspect.signature(type(self)).parameters if hasattr(self, k)}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({params})"


# ---- network plumbing ----------------------------------------------------------------------------------


def forward_outputs(net: nn.Module, x: torch.Tensor, with_features: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of one batch; features is (N, 0) when not asked for (logit-only networks work)."""
    if with_features:
        logits, features = net(x, return_feature=True)
        return logits, features.flatten(1)
    logits = net(x)
    return logits, logits.new_empty((logits.shape[0], 0))


@torch.no_grad()
def extract_featureset(net: nn.Module, loader: Iterable, progress: bool = True) -> FeatureSet:
    """Run `net` over a loader of {"data", "label"} batches (OpenOOD's format) and cache its outputs."""
    net.eval()
    device = _device_of(net)
    logits, features, labels = [], [], []
    for batch in tqdm(loader, disable=not progress, desc="features: "):
        batch_logits, batch_features = forward_outputs(net, batch["data"].to(device), with_features=True)
        logits.append(batch_logits.float().cpu())
        features.append(batch_features.float().cpu())
        labels.append(torch.as_tensor(batch["label"]).cpu())
    return FeatureSet(
        logits=torch.cat(logits).numpy(),
        features=torch.cat(features).numpy(),
        labels=torch.cat(labels).numpy().astype(np.int64),
    )


def _device_of(net: nn.Module) -> torch.device:
    first = next(net.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _check_fc(fc: Fc, feature_dim: int) -> Fc:
    weight, bias = (np.asarray(_numpy(v), dtype=np.float32) for v in fc)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"fc must be (W (C, D), b (C,)), got shapes {weight.shape} and {bias.shape}")
    if weight.shape[1] != feature_dim:
        raise ValueError(f"fc weight has {weight.shape[1]} inputs but the features are {feature_dim}-d")
    return weight, bias


# ---- registry (timm's register_model / create_model / list_models) -------------------------------------


def register_postprocessor(name: str) -> Callable[[type[Postprocessor]], type[Postprocessor]]:
    """Class decorator: register a Postprocessor subclass under `name` and set its ``name``."""

    def decorate(cls: type[Postprocessor]) -> type[Postprocessor]:
        if name in _REGISTRY:
            raise ValueError(f"postprocessor {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_postprocessors() -> list[str]:
    """Sorted registry names."""
    return sorted(_REGISTRY)


def create_postprocessor(name: str, **kwargs: Any) -> Postprocessor:
    """Build a registered postprocessor; unknown names or arguments raise UserError."""
    if name not in _REGISTRY:
        raise UserError(f"unknown postprocessor {name!r}; choose one of: {', '.join(list_postprocessors())}")
    cls = _REGISTRY[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(
            f"postprocessor {name!r} does not take {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'no arguments'}"
        )
    return cls(**kwargs)
