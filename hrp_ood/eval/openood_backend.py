"""`hrp-ood evaluate --backend openood`: OpenOOD's own postprocessors on our wrapped network.

OpenOOD's postprocessors run their own passes through OpenOOD-style loaders (batches of
{"data", "label"}), one per postprocessor and dataset, exactly as OpenOOD's evaluator does; the
metrics are then computed by our metrics module, which matches OpenOOD's `compute_all_metrics`
(tests/test_metrics.py). OpenOOD itself calls `.cuda()` in several postprocessors, so this path
needs a GPU; the default backend (ours) does not.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from hrp_ood.data import DataBundle
from hrp_ood.eval.evaluate import MEAN_ROW, METRIC_KEYS, EvalResult
from hrp_ood.eval.features import channel_stats, normalise_batch
from hrp_ood.eval.metrics import accuracy, ood_metrics
from hrp_ood.postprocessors.openood_adapter import create_openood_postprocessor


class OpenOODLoader:
    """Batches {"data": normalised float tensor, "label": int64 tensor} over uint8 images, as OpenOOD's loaders."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray | None, mean, std, batch_size: int,
                 device: torch.device):
        self.images, self.batch_size, self.device = images, batch_size, device
        self.mean, self.std = channel_stats(mean, std, device)
        self.labels = torch.as_tensor(labels if labels is not None else np.full(len(images), -1), dtype=torch.long)

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            x = self.images[start:start + self.batch_size].to(self.device)
            yield {"data": normalise_batch(x, self.mean, self.std), "label": self.labels[start:start + self.batch_size]}


def evaluate_with_openood(net: nn.Module, bundle: DataBundle, ood_images: dict[str, torch.Tensor],
                          postprocessors: list[str], *, device: torch.device, batch_size: int = 256) -> EvalResult:
    def loader(images, labels=None):
        return OpenOODLoader(images, labels, bundle.mean, bundle.std, batch_size, device)

    id_test = loader(bundle.test_images, bundle.test_labels)
    id_loaders = {"train": loader(bundle.train_images, bundle.train_labels), "val": id_test, "test": id_test}
    ood_loaders = {"val": {}, "nearood": {}, "farood": {name: loader(images) for name, images in ood_images.items()}}
    net = net.to(device).eval()
    rows, scores, id_accuracy = [], {}, float("nan")
    for name in postprocessors:
        method = create_openood_postprocessor(name, dataset=bundle.name)
        method.setup(net, id_loaders, ood_loaders)
        pred, conf, labels = method.inference(net, id_test, progress=False)
        id_accuracy = accuracy(pred, labels)
        scores[f"{name}/id"] = np.asarray(conf, dtype=np.float64)
        per_set = []
        for set_name, set_loader in ood_loaders["farood"].items():
            _, ood_conf, _ = method.inference(net, set_loader, progress=False)
            scores[f"{name}/{set_name}"] = np.asarray(ood_conf, dtype=np.float64)
            per_set.append({"postprocessor": name, "ood": set_name, **ood_metrics(conf, ood_conf)})
        mean = {key: float(np.mean([row[key] for row in per_set])) for key in METRIC_KEYS}
        rows += per_set + [{"postprocessor": name, "ood": MEAN_ROW, **mean}]
    return EvalResult(rows=rows, id_accuracy=id_accuracy, scores=scores)
