"""Tiny datasets written in the REAL on-disk formats, for tests that load data through the product's loaders.

Images are class-coloured noise (a per-class base colour + uniform noise), so a small network can
learn them; labels cycle through every class before being shuffled, so each class is present as
soon as n >= number of classes. Every writer returns the arrays it wrote (uint8 N×3×H×W, int64).
Images are encoded with Pillow, independently of the torchvision decoders the loaders use.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Superclass of each CIFAR-100 fine label (fine ids 0..99, alphabetical), as in the real release's pickles.
CIFAR100_COARSE_OF_FINE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
], dtype=np.int64)


@dataclass
class FakeSplit:
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    train_coarse_labels: np.ndarray | None = None


def cycling_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """0, 1, …, C−1, 0, 1, … shuffled: every class appears once n >= C, counts differ by at most 1."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def class_coloured_images(labels: np.ndarray, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    colours = rng.integers(40, 216, (num_classes, 3, 1, 1))
    noise = rng.integers(-40, 41, (len(labels), 3, size, size))
    return np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)


def _split(n_train: int, n_test: int, num_classes: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    train_labels, test_labels = cycling_labels(n_train, num_classes, rng), cycling_labels(n_test, num_classes, rng)
    return (class_coloured_images(train_labels, num_classes, size, rng), train_labels,
            class_coloured_images(test_labels, num_classes, size, rng), test_labels)


def _pickle(path: Path, content: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(content, f, protocol=2)  # the release was written by Python 2: bytes keys, protocol 2


def _cifar_batch(images: np.ndarray, name: str, **labels: np.ndarray) -> dict:
    batch = {b"batch_label": name.encode(), b"data": images.reshape(len(images), -1),
             b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))]}
    batch.update({key.encode(): value.tolist() for key, value in labels.items()})
    return batch


def write_cifar10(root: str | Path, n_train: int = 100, n_test: int = 50, seed: int = 0) -> FakeSplit:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, train split over the 5 batches."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = _split(n_train, n_test, 10, 32, seed)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        batch = _cifar_batch(train_x[part], f"training batch {i} of 5", labels=train_y[part])
        _pickle(folder / f"data_batch_{i}", batch)
    _pickle(folder / "test_batch", _cifar_batch(test_x, "testing batch 1 of 1", labels=test_y))
    _pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                      b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return FakeSplit(train_x, train_y, test_x, test_y, list(CIFAR10_CLASSES))


def write_cifar100(root: str | Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> FakeSplit:
    """root/cifar-100-python/{train, test, meta} with fine_labels and the real fine→coarse superclass map."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = _split(n_train, n_test, 100, 32, seed)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        _pickle(folder / name, _cifar_batch(x, name, fine_labels=y, coarse_labels=CIFAR100_COARSE_OF_FINE[y]))
    _pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in fine_names],
                              b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)]})
    return FakeSplit(train_x, train_y, test_x, test_y, fine_names, CIFAR100_COARSE_OF_FINE[train_y])


def save_image(path: Path, image_chw: np.ndarray, quality: int = 95) -> None:
    picture = Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0)))
    picture.save(path, quality=quality) if path.suffix.lower() in (".jpg", ".jpeg") else picture.save(path)


def write_image_folder(root: str | Path, classes: tuple[str, ...] = ("a", "b", "c"), n_per_class: int = 5,
                       size: int = 32, splits: tuple[str, ...] = ("train", "test"), seed: int = 0,
                       ext: str = ".png") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """root/<split>/<class>/<i>.png; returns {split: (images, labels)}, labels indexing sorted(classes)."""
    rng = np.random.default_rng(seed)
    classes = tuple(sorted(classes))
    written = {}
    for split in splits:
        labels = np.repeat(np.arange(len(classes)), n_per_class).astype(np.int64)
        images = class_coloured_images(labels, len(classes), size, rng)
        for i, (image, label) in enumerate(zip(images, labels)):
            class_dir = Path(root) / split / classes[label]
            class_dir.mkdir(parents=True, exist_ok=True)
            save_image(class_dir / f"{i:04d}{ext}", image)
        written[split] = (images, labels)
    return written


def write_animal10n(root: str | Path, n_train: int = 30, n_test: int = 10, seed: int = 0, size: int = 64,
                    dirs: tuple[str, str] = ("training", "testing")) -> FakeSplit:
    """root/training/<label>_<id>.jpg and root/testing/<label>_<id>.jpg, as Animal-10N ships them."""
    from hrp_ood.data.folder import ANIMAL10N_CLASSES

    train_x, train_y, test_x, test_y = _split(n_train, n_test, 10, size, seed)
    for folder, images, labels in ((dirs[0], train_x, train_y), (dirs[1], test_x, test_y)):
        (Path(root) / folder).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            save_image(Path(root) / folder / f"{label}_{i:05d}.jpg", image)
    return FakeSplit(train_x, train_y, test_x, test_y, list(ANIMAL10N_CLASSES))
