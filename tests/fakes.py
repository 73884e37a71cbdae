"""Tiny datasets written in the REAL on-disk formats, for tests that load data through the product's loaders.

Images are class-coloured noise (a per-class base colour + uniform noise), so a small network can
learn them; labels cycle through every class before being shuffled, so each class is present as
soon as n >= number of classes. Every writer returns the arrays it wrote (uint8 N×3×H×W, int64).
Images are encoded with Pillow, independently of the torchvision decoders the loaders use.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Superclass of each CIFAR-100 fine label (fine ids 0..99, alphabetical), as in the real release's pickles.
CIFAR100_COARSE_OF_FINE = np.array(
    [
        4,
        1,
        14,
        8,
        0,
        6,
        7,
        7,
        18,
        3,
        3,
        14,
        9,
        18,
        7,
        11,
        3,
        9,
        7,
        11,
        6,
        11,
        5,
        10,
        7,
        6,
        13,
        15,
        3,
        15,
        0,
        11,
        1,
        10,
        12,
        14,
        16,
        9,
        11,
        5,
        5,
        19,
        8,
        8,
        15,
        13,
        14,
        17,
        18,
        10,
        16,
        4,
        17,
        4,
        2,
        0,
        17,
        4,
        18,
        17,
        10,
        3,
        2,
        12,
        12,
        16,
        12,
        1,
        9,
        19,
        2,
        10,
        0,
        1,
        16,
        12,
        9,
        13,
        15,
        13,
        16,
        19,
        2,
        4,
        6,
        19,
        5,
        5,
        8,
        19,
        18,
        1,
        2,
        15,
        6,
        0,
        17,
        8,
        14,
        13,
    ],
    dtype=np.int64,
)


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


def class_coloured_images(
    labels: np.ndarray, num_classes: int, size: int, rng: np.random.Generator, colours: np.ndarray | None = None
) -> np.ndarray:
    """Per-class base colour (drawn here unless `colours` (C, 3, 1, 1) are given) plus uniform noise."""
    colours = rng.integers(40, 216, (num_classes, 3, 1, 1)) if colours is None else colours
    noise = rng.integers(-40, 41, (len(labels), 3, size, size))
    return np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)


def _split(n_train: int, n_test: int, num_classes: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    train_labels, test_labels = cycling_labels(n_train, num_classes, rng), cycling_labels(n_test, num_classes, rng)
    return (
        class_coloured_images(train_labels, num_classes, size, rng),
        train_labels,
        class_coloured_images(test_labels, num_classes, size, rng),
        test_labels,
    )


def _pickle(path: Path, content: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(content, f, protocol=2)  # the release was written by Python 2: bytes keys, protocol 2


def _cifar_batch(images: np.ndarray, name: str, **labels: np.ndarray) -> dict:
    batch = {
        b"batch_label": name.encode(),
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))],
    }
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
    _pickle(
        folder / "batches.meta",
        {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072},
    )
    return FakeSplit(train_x, train_y, test_x, test_y, list(CIFAR10_CLASSES))


def write_cifar100(root: str | Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> FakeSplit:
    """root/cifar-100-python/{train, test, meta} with fine_labels and the real fine→coarse superclass map."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = _split(n_train, n_test, 100, 32, seed)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        _pickle(folder / name, _cifar_batch(x, name, fine_labels=y, coarse_labels=CIFAR100_COARSE_OF_FINE[y]))
    _pickle(
        folder / "meta",
        {
            b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
        },
    )
    return FakeSplit(train_x, train_y, test_x, test_y, fine_names, CIFAR100_COARSE_OF_FINE[train_y])


def save_image(path: Path, image_chw: np.ndarray, quality: int = 95) -> None:
    picture = Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0)))
    picture.save(path, quality=quality) if path.suffix.lower() in (".jpg", ".jpeg") else picture.save(path)


def write_image_folder(
    root: str | Path,
    classes: tuple[str, ...] = ("a", "b", "c"),
    n_per_class: int = 5,
    size: int = 32,
    splits: tuple[str, ...] = ("train", "test"),
    seed: int = 0,
    ext: str = ".png",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def write_animal10n(
    root: str | Path,
    n_train: int = 30,
    n_test: int = 10,
    seed: int = 0,
    size: int = 64,
    dirs: tuple[str, str] = ("training", "testing"),
) -> FakeSplit:
    """root/training/<label>_<id>.jpg and root/testing/<label>_<id>.jpg, as Animal-10N ships them."""
    from hrp_ood.data.folder import ANIMAL10N_CLASSES

    train_x, train_y, test_x, test_y = _split(n_train, n_test, 10, size, seed)
    for folder, images, labels in ((dirs[0], train_x, train_y), (dirs[1], test_x, test_y)):
        (Path(root) / folder).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            save_image(Path(root) / folder / f"{label}_{i:05d}.jpg", image)
    return FakeSplit(train_x, train_y, test_x, test_y, list(ANIMAL10N_CLASSES))


# ------------------------------------------------------------------------------------------ OOD test sets
# Each writer puts a set where `hrp_ood.eval.ood_data` looks for it, in the format the real download has,
# and returns the pixels it wrote (so a test can compare them with what the loader returns).

# File stem of OpenOOD's image list per set where it differs from the set name (OpenOOD names DTD "texture").
OPENOOD_LIST_STEMS = {"textures": "texture"}
DTD_CATEGORIES = ("banded", "dotted", "striped")


def random_images(n: int, size: int = 32, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Uniform-noise uint8 images (n, channels, size, size): unlike the class-coloured ID data."""
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def write_openood_imglist(
    root: str | Path,
    id_dataset: str,
    name: str,
    images: np.ndarray,
    list_name: str | None = None,
    labels: np.ndarray | None = None,
    split: str = "test",
) -> Path:
    """OpenOOD's layout: `benchmark_imglist/<id_dataset>/test_<stem>.txt` with one "relative/path label" line per
    image (label -1 unless `labels` are given), and the PNGs under `images_classic/<name>/<split>/`. images: uint8
    (N, 3, H, W), written in list order. list_name overrides the list's file name (default OpenOOD's
    `test_<stem>.txt`). Returns the list file."""
    root = Path(root)
    lines = []
    for k, image in enumerate(images):
        relative = f"{name}/{split}/{k:04d}.png"
        (root / "images_classic" / relative).parent.mkdir(parents=True, exist_ok=True)
        save_image(root / "images_classic" / relative, image)
        lines.append(f"{relative} {-1 if labels is None else int(labels[k])}")
    list_name = list_name or f"test_{OPENOOD_LIST_STEMS.get(name, name)}.txt"
    list_file = root / "benchmark_imglist" / id_dataset / list_name
    list_file.parent.mkdir(parents=True, exist_ok=True)
    list_file.write_text("\n".join(lines) + "\n")
    return list_file


def write_svhn_mat(root: str | Path, n: int, seed: int = 0) -> np.ndarray:
    """`root/svhn/test_32x32.mat` as SVHN ships it: X (32, 32, 3, N) uint8 and y (N, 1) in 1..10.
    Returns the images as (N, 3, 32, 32)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    (Path(root) / "svhn").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        Path(root) / "svhn" / "test_32x32.mat",
        {"X": images.transpose(2, 3, 1, 0), "y": rng.integers(1, 11, size=(n, 1))},
    )
    return images


def write_idx_images(path: str | Path, images: np.ndarray, *, compress: bool = False, magic: int = 2051) -> None:
    """An idx3-ubyte file byte by byte: magic (2051 = images), N, rows, cols as big-endian uint32, then pixels."""
    n, rows, cols = images.shape
    payload = struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)


def write_mnist_idx(root: str | Path, n: int, compress: bool = False, seed: int = 0, size: int = 28) -> np.ndarray:
    """torchvision's MNIST layout: `root/MNIST/raw/t10k-images-idx3-ubyte[.gz]`. Returns the digits (N, size, size)."""
    digits = np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)
    name = "t10k-images-idx3-ubyte" + (".gz" if compress else "")
    write_idx_images(Path(root) / "MNIST" / "raw" / name, digits, compress=compress)
    return digits


def write_ood_folder(
    folder: str | Path, images: np.ndarray, subfolders: tuple[str, ...] = (), ext: str = ".png"
) -> list[Path]:
    """Images (N, 3, H, W) as `<folder>/[<sub>/]<k>.png`, spread round-robin over `subfolders` (if any).
    Returns the paths in the order the images were given."""
    paths = []
    for k, image in enumerate(images):
        sub = subfolders[k % len(subfolders)] if subfolders else ""
        path = Path(folder) / sub / f"{k:04d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(path, image)
        paths.append(path)
    return paths


def write_far_ood_sets(
    root: str | Path, n: int = 40, id_dataset: str = "cifar10", seed: int = 0
) -> dict[str, np.ndarray]:
    """The paper's five OOD sets under `root`, each in a different supported format: svhn as `svhn/test_32x32.mat`,
    lsun and places365 (48x48, so the loader resizes) as OpenOOD image lists, textures as the
    `dtd/images/<category>/` folder, mnist as gzip idx. Returns {set name: the images written, in writing order}:
    (N, 3, H, W), mnist (N, 28, 28); the folder loader reads textures back sorted by path, not in this order."""
    root = Path(root)
    written = {
        "svhn": write_svhn_mat(root, n, seed=seed),
        "lsun": random_images(n, seed=seed + 1),
        "places365": random_images(n, size=48, seed=seed + 2),
        "textures": random_images(n, seed=seed + 3),
    }
    write_openood_imglist(root, id_dataset, "lsun", written["lsun"])
    write_openood_imglist(root, id_dataset, "places365", written["places365"])
    write_ood_folder(root / "dtd" / "images", written["textures"], subfolders=DTD_CATEGORIES)
    written["mnist"] = write_mnist_idx(root, n, compress=True, seed=seed + 4)
    return written


def write_openood_cifar10_root(
    root: str | Path, n_train: int = 1000, n_val: int = 60, n_test: int = 50, n_ood: int = 40, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """An OpenOOD data root for the cifar10 benchmark, as OpenOOD's download script lays it out:
    `benchmark_imglist/cifar10/{train,val,test}_cifar10.txt` (class-coloured images, one palette, labels 0-9),
    `val_tin.txt` (OOD-val: class-coloured images in another palette, near-OOD-like) and the far-OOD test lists
    (mnist, svhn, texture, places365 — the last 48x48, so the loader resizes), PNGs under `images_classic/`.
    Returns {part: (images in list order, labels or None)}."""
    rng = np.random.default_rng(seed)
    palette, other_palette = rng.integers(40, 216, (2, 10, 3, 1, 1))
    written: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = cycling_labels(n, 10, rng)
        written[split] = (class_coloured_images(labels, 10, 32, rng, palette), labels)
        write_openood_imglist(root, "cifar10", "cifar10", written[split][0], f"{split}_cifar10.txt", labels, split)
    written["val_tin"] = (class_coloured_images(cycling_labels(n_ood, 10, rng), 10, 32, rng, other_palette), None)
    write_openood_imglist(root, "cifar10", "tin", written["val_tin"][0], "val_tin.txt", split="val")
    for k, name in enumerate(("mnist", "svhn", "textures", "places365")):
        written[name] = (random_images(n_ood, size=48 if name == "places365" else 32, seed=seed + 11 + k), None)
        write_openood_imglist(root, "cifar10", name, written[name][0])
    return written


class CountingNet(torch.nn.Module):
    """OpenOOD's network contract (return_feature, get_fc) on a tiny seeded MLP; counts its forward calls."""

    def __init__(
        self,
        num_classes: int = 3,
        size: int = 8,
        width: int = 6,
        activation: str = "relu",
        dropout: float = 0.5,
        scale: float = 0.3,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        act = {"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh()}[activation]
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * size * size, width), act, torch.nn.Dropout(dropout)
        )
        self.fc = torch.nn.Linear(width, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
        self.calls = 0

    def forward(self, x, return_feature=False):
        self.calls += 1
        feature = self.body(x)
        logits = self.fc(feature)
        return (logits, feature) if return_feature else logits

    def get_fc(self):
        return self.fc.weight.detach().numpy().copy(), self.fc.bias.detach().numpy().copy()
