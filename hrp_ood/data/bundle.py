"""The in-memory dataset every part of the package trains and evaluates on (SPEC §2).

Images are held as uint8 tensors (N, 3, H, W) so that augmentation runs on whole batches on the
training device; labels are int64 numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hrp_ood.errors import UserError


@dataclass
class DataBundle:
    """One dataset, fully loaded.

    train_labels are the labels as shipped: clean for CIFAR, the dataset's own noisy labels for
    Animal-10N. train_coarse_labels are CIFAR-100's superclasses (needed by asymmetric noise).
    mean/std are per channel in [0, 1] pixel scale.
    """

    name: str
    classes: list[str]
    image_size: int
    train_images: torch.Tensor
    train_labels: np.ndarray
    test_images: torch.Tensor
    test_labels: np.ndarray
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_coarse_labels: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, 3, H, W), in [0, 1] pixel scale.

    Exact and cheap from each channel's 256-bin histogram h(v): with x = v/255,
    mean = Σ_v h(v)·x / Σ h,  std = sqrt(Σ_v h(v)·x² / Σ h − mean²)   (population std).
    """
    if len(images) == 0:
        raise UserError("cannot compute the mean/std of an empty training set; add training images")
    values = torch.arange(256, dtype=torch.float64, device=images.device) / 255.0
    counts = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])]).to(
        torch.float64
    )
    total = counts.sum(dim=1)
    mean = counts @ values / total
    std = (counts @ values.square() / total - mean.square()).clamp_min(0.0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def reject_download(name: str, root: Path, download: bool) -> None:
    """Only CIFAR can be downloaded; asking for it elsewhere is a user mistake, not something to ignore."""
    if download:
        raise UserError(f"--download is only available for cifar10/cifar100; put the {name} files under {root}")


def check_native_size(name: str, native: int, image_size: int | None) -> None:
    """Datasets with one fixed size accept image_size only when it names that size."""
    if image_size is not None and image_size != native:
        raise UserError(
            f"dataset {name} has a fixed image size of {native}, got image_size={image_size}; "
            "drop image_size (it resizes image folders and Animal-10N only)"
        )
