"""scikit-learn's bundled handwritten digits as a tiny 32×32 RGB dataset: the offline default of `hrp-ood demo`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hrp_ood.data.bundle import DataBundle, channel_stats, check_native_size, reject_download

DIGITS_SIZE = 32
DIGITS_TEST = 500
DIGITS_SPLIT_SEED = 0  # part of the dataset's definition, like CIFAR's fixed train/test split
DIGITS_MAX = 16.0  # load_digits pixel values are counts 0–16


def digits_images(pixels: np.ndarray, size: int = DIGITS_SIZE) -> torch.Tensor:
    """(N, 8, 8) values in [0, 16] → uint8 (N, 3, size, size): rescale to [0, 255], bilinear upsample, grey → RGB."""
    grey = torch.as_tensor(pixels, dtype=torch.float32)[:, None] * (255.0 / DIGITS_MAX)
    grey = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    return grey.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def load_digits_dataset(
    root: Path | None = None, *, download: bool = False, image_size: int | None = None
) -> DataBundle:
    """1,797 digits split (stratified, fixed seed) into 1,297 train / 500 test; `root` is unused (no files)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    reject_download("digits", Path(root or "."), download)
    check_native_size("digits", DIGITS_SIZE, image_size)
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    images = digits_images(digits.images)
    mean, std = channel_stats(images[train_idx])
    return DataBundle(
        name="digits",
        classes=[str(d) for d in range(10)],
        image_size=DIGITS_SIZE,
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        test_images=images[test_idx],
        test_labels=labels[test_idx],
        mean=mean,
        std=std,
    )
