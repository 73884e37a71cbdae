"""The clean meta set: samples held out of the noisy training split with their true labels (SPEC §2, Eq. 3)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from hrp_ood.errors import UserError
from hrp_ood.io import atomic_write


def class_quotas(num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """How many meta samples each class gives: size // C each, and the remainder size mod C spread as one
    extra sample over that many classes drawn at random (so no class is favoured by its index)."""
    quotas = np.full(num_classes, size // num_classes, dtype=np.int64)
    quotas[rng.choice(num_classes, size % num_classes, replace=False)] += 1
    return quotas


def _balanced_pick(labels: np.ndarray, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    quotas = class_quotas(num_classes, size, rng)
    counts = np.bincount(labels, minlength=num_classes)
    short = np.flatnonzero(counts < quotas)
    if len(short):
        c = short[0]
        raise UserError(
            f"class {c} has {counts[c]} training samples, fewer than the {quotas[c]} a balanced "
            f"meta set of {size} needs; lower meta_size or set meta_balanced to false"
        )
    # Shuffle, then stably group by class: inside each class the order is random, and a sample's rank
    # within its class decides whether it falls inside the class quota.
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    class_start = np.r_[0, np.cumsum(counts)[:-1]]
    rank = np.arange(len(labels)) - class_start[labels[order]]
    return order[rank < quotas[labels[order]]]


def split_meta_set(
    clean_labels: np.ndarray, num_classes: int, size: int = 1000, seed: int = 0, *, balanced: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(meta_indices, train_indices): sorted int64, disjoint, together every index of `clean_labels`.

    balanced: size // C samples per class, the remainder (size mod C) going one each to random
    classes (1,000 → 100 per class on CIFAR-10, 10 on CIFAR-100); otherwise a uniform random subset.
    Reproducible from `seed` (np.random.default_rng).
    """
    labels = np.asarray(clean_labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if not 0 <= size <= len(labels):
        raise UserError(f"meta_size must be between 0 and the {len(labels)} training samples, got {size}")
    rng = np.random.default_rng(seed)
    meta = _balanced_pick(labels, num_classes, size, rng) if balanced else rng.choice(len(labels), size, replace=False)
    is_meta = np.zeros(len(labels), dtype=bool)
    is_meta[meta] = True
    return np.flatnonzero(is_meta).astype(np.int64), np.flatnonzero(~is_meta).astype(np.int64)


def save_indices(path: str | Path, **arrays: np.ndarray) -> None:
    """Write named integer arrays to an .npz, atomically."""
    atomic_write(path, lambda f: np.savez(f, **{name: np.asarray(a, dtype=np.int64) for name, a in arrays.items()}))


def load_indices(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays save_indices wrote, by name."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name].astype(np.int64) for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(
            f"index file {path} is unreadable ({err}); delete it to redraw the split "
            "(the same seed gives the same split)"
        ) from err
