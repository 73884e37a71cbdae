"""`hrp-ood evaluate --backend openood`: OpenOOD's own postprocessors on our wrapped network.

OpenOOD's postprocessors run their own passes through OpenOOD-style loaders (batches of
{"data", "label"}), one per postprocessor and dataset, as OpenOOD's evaluator does: ``setup`` with
the ID loaders (train, val, test), then ``postprocess`` batch by batch. We drive ``postprocess``
ourselves with batches already on the network's device, instead of ``BasePostprocessor.inference``,
which moves every batch with ``.cuda()``: so the methods whose ``setup`` does not call ``.cuda()`` run
on CPU too (``postprocessors.openood_adapter`` says which). ReAct's ``setup`` reads the ID 'val'
loader: the validation split's ID part when there is one, else ID train (our backend's rule). With
``tune``, OpenOOD's parameter search (``hrp_ood.eval.tuning``) drives ``set_hyperparam`` on the
validation split. The metrics come from our metrics module, which matches OpenOOD's
``compute_all_metrics`` (tests/test_metrics.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from hrp_ood.data import DataBundle
from hrp_ood.data.sources import ImageSource, pixels
from hrp_ood.eval.evaluate import MEAN_ROW, METRIC_KEYS, EvalResult, check_finite_scores
from hrp_ood.eval.features import channel_stats, normalise_batch
from hrp_ood.eval.metrics import accuracy, ood_metrics
from hrp_ood.eval.tuning import SELECTION_RULE, search_openood
from hrp_ood.eval.validation import ValidationImages, require_both_parts
from hrp_ood.postprocessors import create_postprocessor
from hrp_ood.postprocessors.openood_adapter import OPENOOD_DEFAULTS, create_openood_postprocessor


class OpenOODLoader:
    """Batches {"data": normalised float tensor, "label": int64 tensor} over uint8 images, as OpenOOD's loaders."""

    def __init__(
        self, images: torch.Tensor, labels: np.ndarray | None, mean, std, batch_size: int, device: torch.device
    ):
        self.images, self.batch_size, self.device = images, batch_size, device
        self.mean, self.std = channel_stats(mean, std, device)
        self.labels = torch.as_tensor(labels if labels is not None else np.full(len(images), -1), dtype=torch.long)

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            x = self.images[start : start + self.batch_size].to(self.device)
            yield {
                "data": normalise_batch(x, self.mean, self.std),
                "label": self.labels[start : start + self.batch_size],
            }


def openood_inference(
    postprocessor: Any, net: nn.Module, loader: Iterable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred, conf, label) over `loader`: OpenOOD's ``inference`` without its ``.cuda()`` (batches are on the
    network's device already). No ``no_grad`` here: ODIN differentiates with respect to its input."""
    preds, confs, labels = [], [], []
    for batch in loader:
        pred, conf = postprocessor.postprocess(net, batch["data"])
        preds.append(torch.as_tensor(pred).detach().cpu())
        confs.append(torch.as_tensor(conf).detach().cpu())
        labels.append(torch.as_tensor(batch["label"]).cpu())
    return (torch.cat(preds).numpy().astype(int), torch.cat(confs).numpy(), torch.cat(labels).numpy().astype(int))


def evaluate_with_openood(
    net: nn.Module,
    bundle: DataBundle,
    ood_images: dict[str, torch.Tensor | ImageSource],
    postprocessors: list[str],
    *,
    device: torch.device,
    batch_size: int = 256,
    validation: ValidationImages | None = None,
    tune: bool = False,
    dataset: str | None = None,
) -> EvalResult:
    """OpenOOD's postprocessors `postprocessors` on `net`; `dataset` is the name OpenOOD's tables are asked about."""
    if tune:
        require_both_parts(validation)

    def loader(images: torch.Tensor | ImageSource | None, labels: np.ndarray | None = None) -> OpenOODLoader | None:
        if images is None:
            return None
        return OpenOODLoader(pixels(images), labels, bundle.mean, bundle.std, batch_size, device)

    id_test, id_train = loader(bundle.test_images, bundle.test_labels), loader(bundle.train_images, bundle.train_labels)
    val_id = loader(validation.id_images) if validation is not None else None
    val_ood = loader(validation.ood_images) if validation is not None else None
    id_loaders = {"train": id_train, "val": val_id or id_train, "test": id_test}
    far = {name: loader(images) for name, images in ood_images.items()}
    ood_loaders = {"val": val_ood, "near": {}, "far": far}  # the keys of OpenOOD v1.5's Evaluator
    net = net.to(device).eval()
    rows, scores, id_accuracy = [], {}, float("nan")
    settings: dict[str, Any] = {
        "hyperparameters": {},
        "fit_on": {},
        "validation": None if validation is None else validation.describe(),
        "tuning": {"enabled": tune},
    }
    for name in postprocessors:
        method = create_openood_postprocessor(
            name, dataset=dataset or bundle.name, num_classes=bundle.num_classes, input_std=bundle.std
        )
        method.setup(net, id_loaders, ood_loaders)
        ours = create_postprocessor(name)
        chosen: dict[str, Any] = {}
        if tune and ours.openood_sweep:
            search = search_openood(
                name,
                ours.openood_sweep,
                lambda params, method=method: _val_scores(method, params, net, val_id, val_ood),
            )
            method.set_hyperparam(list(search.chosen.values()))
            chosen = search.chosen
            settings["tuning"].setdefault("searched", {})[name] = search.as_json()
        settings["hyperparameters"][name] = {**OPENOOD_DEFAULTS[name][1], **chosen}
        if ours.requires_fit:
            settings["fit_on"][name] = "id_val" if ours.fit_split == "val" and val_id is not None else "id_train"
        pred, conf, labels = openood_inference(method, net, id_test)
        id_accuracy = accuracy(pred, labels)
        scores[f"{name}/id"] = np.asarray(conf, dtype=np.float64)
        check_finite_scores(name, "the ID test set", conf)
        per_set = []
        for set_name, set_loader in far.items():
            _, ood_conf, _ = openood_inference(method, net, set_loader)
            check_finite_scores(name, f"OOD set {set_name}", ood_conf)
            scores[f"{name}/{set_name}"] = np.asarray(ood_conf, dtype=np.float64)
            per_set.append({"postprocessor": name, "ood": set_name, **ood_metrics(conf, ood_conf)})
        mean = {key: float(np.mean([row[key] for row in per_set])) for key in METRIC_KEYS}
        rows += per_set + [{"postprocessor": name, "ood": MEAN_ROW, **mean}]
    settings["tuning"]["rule" if tune else "openood_would_tune"] = (
        SELECTION_RULE if tune else [n for n in postprocessors if create_postprocessor(n).openood_sweep]
    )
    return EvalResult(rows=rows, id_accuracy=id_accuracy, scores=scores, settings=settings)


def _val_scores(
    method: Any, params: dict[str, Any], net: nn.Module, val_id: OpenOODLoader, val_ood: OpenOODLoader
) -> tuple[np.ndarray, np.ndarray]:
    """OpenOOD's search step: ``set_hyperparam`` (values in sweep order), then ID-val and OOD-val scores."""
    method.set_hyperparam(list(params.values()))
    return openood_inference(method, net, val_id)[1], openood_inference(method, net, val_ood)[1]
