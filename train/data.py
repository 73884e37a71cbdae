"""Everything a run trains on, made once and saved in the run folder: noisy labels and the meta set."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hrp_ood.config import TrainConfig
from hrp_ood.data import load_dataset
from hrp_ood.data.meta_set import load_indices, save_indices, split_meta_set
from hrp_ood.data.noise import (
    load_label_file,
    load_noise,
    make_noisy_labels,
    parse_noise,
    realised_noise_rate,
    save_noise,
)
from hrp_ood.errors import UserError

log = logging.getLogger(__name__)

NOISE_FILE = "noise.npz"
META_FILE = "meta_indices.npz"


@dataclass
class TrainingData:
    """Tensors live on the training device; images stay uint8 until a batch is augmented."""

    dataset: str
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    images: torch.Tensor  # (N, 3, H, W) uint8, meta set removed
    noisy_labels: torch.Tensor  # (N,) int64, what the method sees
    clean_labels: torch.Tensor  # (N,) int64, only for logging how well α/T separate clean from corrupted
    meta_images: torch.Tensor
    meta_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    noise_rate: float  # realised rate on the training part

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_clean(self) -> torch.Tensor:
        return self.noisy_labels == self.clean_labels


def _noisy_labels(cfg: TrainConfig, clean: np.ndarray, num_classes: int, coarse: np.ndarray | None) -> np.ndarray:
    if cfg.noisy_labels:
        return load_label_file(cfg.noisy_labels, num_classes, len(clean), key=cfg.noisy_labels_key)
    return make_noisy_labels(
        clean, num_classes, parse_noise(cfg.noise), cfg.seed, dataset=cfg.dataset, coarse_labels=coarse
    )


def check_sizes(cfg: TrainConfig, num_classes: int, num_train: int) -> None:
    """The meta set holds every class (or, for a method that does not use it, is empty: meta_size 0), and a
    training batch fits in what the meta set leaves."""
    if cfg.meta_size < num_classes and (cfg.meta_size > 0 or cfg.spec.needs_meta_set):
        zero = (
            "" if cfg.spec.needs_meta_set else f", or --meta-size 0 to train {cfg.method} on the whole training split"
        )
        raise UserError(
            f"meta_size {cfg.meta_size} is smaller than the {num_classes} classes of {cfg.dataset}: the "
            f"clean meta set needs every class; use --meta-size {num_classes} or more{zero}"
        )
    left = num_train - cfg.meta_size
    if left <= 0:
        raise UserError(
            f"meta_size {cfg.meta_size} leaves none of the {num_train} images of {cfg.dataset} to train "
            "on; lower --meta-size"
        )
    if cfg.batch_size > left:
        raise UserError(
            f"batch_size {cfg.batch_size} exceeds the {left} training images left after the "
            f"{cfg.meta_size}-image meta set ({num_train} in {cfg.dataset}); lower --batch-size "
            "or --meta-size"
        )


def _saved_split(path: Path, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """A run's saved meta/train split, checked: both arrays there, indices of this dataset, and disjoint (a meta
    sample in the training split would train on the clean meta set)."""
    split = load_indices(path)
    missing = [key for key in ("meta_indices", "train_indices") if key not in split]
    if missing:
        raise UserError(
            f"{path} lacks {', '.join(missing)}; delete it to redraw the split (the same seed gives the same)"
        )
    meta_idx, train_idx = split["meta_indices"], split["train_indices"]
    indices = np.concatenate([meta_idx, train_idx])
    outside = indices[(indices < 0) | (indices >= num_samples)]
    shared = np.intersect1d(meta_idx, train_idx)
    if len(outside):
        problem = f"index {int(outside[0])} outside 0..{num_samples - 1}"
    elif len(shared):
        problem = f"{len(shared)} meta sample(s) in the training split (e.g. {int(shared[0])})"
    elif len(np.unique(train_idx)) != len(train_idx):
        problem = "a training index twice"
    else:
        return meta_idx, train_idx
    raise UserError(f"{path} does not split this dataset ({problem}); delete it to redraw the split")


def prepare_training_data(cfg: TrainConfig, run_dir: Path, device: torch.device) -> TrainingData:
    """Load the dataset; create (or reload, on resume) the noise file and the meta-set indices."""
    if not cfg.noisy_labels:
        parse_noise(cfg.noise)  # a bad spec fails before a slow dataset load
    bundle = load_dataset(cfg.dataset, cfg.data_root, download=cfg.download, image_size=cfg.image_size)
    clean = np.asarray(bundle.train_labels, dtype=np.int64)
    check_sizes(cfg, bundle.num_classes, len(clean))

    noise_path = run_dir / NOISE_FILE
    if noise_path.exists():
        noisy, saved_clean, _ = load_noise(noise_path)
        if len(noisy) != len(clean) or not np.array_equal(saved_clean, clean):
            raise UserError(
                f"{noise_path} does not belong to dataset {cfg.dataset!r} at {cfg.data_root}; "
                "point --data-root at the run's dataset or start a new run"
            )
    else:
        noisy = _noisy_labels(cfg, clean, bundle.num_classes, bundle.train_coarse_labels)
        save_noise(noise_path, noisy, clean, spec="file" if cfg.noisy_labels else cfg.noise, seed=cfg.seed)

    meta_path = run_dir / META_FILE
    if meta_path.exists():
        meta_idx, train_idx = _saved_split(meta_path, len(clean))
    else:
        meta_idx, train_idx = split_meta_set(
            clean, bundle.num_classes, cfg.meta_size, cfg.seed, balanced=cfg.meta_balanced
        )
        save_indices(meta_path, meta_indices=meta_idx, train_indices=train_idx)

    rate = realised_noise_rate(noisy[train_idx], clean[train_idx])
    log.info(
        "dataset %s: %d train / %d meta / %d test, %d classes; realised label-noise rate %.4f",
        bundle.name,
        len(train_idx),
        len(meta_idx),
        len(bundle.test_labels),
        bundle.num_classes,
        rate,
    )

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)

    train_t = torch.as_tensor(train_idx)
    meta_t = torch.as_tensor(meta_idx)
    return TrainingData(
        dataset=bundle.name,
        classes=list(bundle.classes),
        mean=tuple(bundle.mean),
        std=tuple(bundle.std),
        image_size=bundle.image_size,
        images=bundle.train_images[train_t].to(device),
        noisy_labels=labels(noisy[train_idx]),
        clean_labels=labels(clean[train_idx]),
        meta_images=bundle.train_images[meta_t].to(device),
        meta_labels=labels(clean[meta_idx]),
        test_images=bundle.test_images.to(device),
        test_labels=labels(bundle.test_labels),
        noise_rate=rate,
    )
