"""CIFAR-10 / CIFAR-100 from the standard python-pickle release (SPEC §2).

Layout read (exactly what https://www.cs.toronto.edu/~kriz/cifar.html ships, and what
torchvision's `download=True` extracts):

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-100-python/{train, test, meta}

Each batch is a pickled dict with b"data" (N, 3072) uint8 in channel-major order and
b"labels" (CIFAR-10) or b"fine_labels" / b"coarse_labels" (CIFAR-100).
"""

from __future__ import annotations

import codecs
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrp_ood.data.bundle import DataBundle, check_native_size
from hrp_ood.errors import UserError, shown

log = logging.getLogger(__name__)

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN, "test_batch", "batches.meta")
CIFAR100_DIR = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")
CIFAR_SIZE = 32

# Channel statistics in [0, 1] pixel scale, the constants OpenOOD uses for its CIFAR benchmarks.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array-rebuilding function, whatever its module
_SAFE_GLOBALS = {
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes into a protocol-2 pickle
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only: a tampered file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def read_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys (the release was written by Python 2: bytes keys)."""
    try:
        with path.open("rb") as f:
            raw = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"cannot read CIFAR file {path} ({err}); delete it and re-extract or re-download") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a CIFAR batch (expected a pickled dict); re-extract the archive")
    return {_text(key): value for key, value in raw.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise UserError(f"{path} has no {key!r} entry (found {sorted(batch)}); is this the python version of CIFAR?")
    return batch[key]


def _images(batch: dict[str, Any], path: Path) -> torch.Tensor:
    data = np.asarray(_field(batch, "data", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIZE * CIFAR_SIZE:
        raise UserError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    return torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE)))


def _labels(batch: dict[str, Any], key: str, path: Path) -> np.ndarray:
    return np.asarray(_field(batch, key, path), dtype=np.int64)


def _require_files(folder: Path, files: tuple[str, ...], name: str, url: str) -> None:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"{name} not found: expected {shown(folder)}/{{{', '.join(files)}}} "
            f"(missing: {', '.join(missing)}); "
            f"extract {url} into {folder.parent}, or let `hrp-ood train --download` fetch it"
        )


def _download(name: str, root: Path) -> None:
    import torchvision

    from hrp_ood.progress import no_download_bar_off_terminal

    dataset_class = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    log.info("downloading %s into %s", name, root)
    try:
        with no_download_bar_off_terminal():
            dataset_class(root=str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad checksum is a RuntimeError
        raise UserError(
            f"downloading {name} into {root} failed ({err}); check the network or fetch the archive by hand"
        ) from err


def _prepare(name: str, root: Path, folder: Path, files: tuple[str, ...], url: str, download: bool) -> None:
    if download and not all((folder / f).is_file() for f in files):
        _download(name, root)
    _require_files(folder, files, name, url)


def load_cifar10(root: Path, *, download: bool = False, image_size: int | None = None) -> DataBundle:
    """CIFAR-10: 50,000 train / 10,000 test 32×32 images, clean labels, 10 classes."""
    check_native_size("cifar10", CIFAR_SIZE, image_size)
    folder = root / CIFAR10_DIR
    _prepare(
        "cifar10", root, folder, CIFAR10_FILES, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", download
    )
    train = [(read_pickle(folder / f), folder / f) for f in CIFAR10_TRAIN]
    test_path = folder / "test_batch"
    test = read_pickle(test_path)
    meta_path = folder / "batches.meta"
    classes = [_text(c) for c in _field(read_pickle(meta_path), "label_names", meta_path)]
    return DataBundle(
        name="cifar10",
        classes=classes,
        image_size=CIFAR_SIZE,
        train_images=torch.cat([_images(b, p) for b, p in train]),
        train_labels=np.concatenate([_labels(b, "labels", p) for b, p in train]),
        test_images=_images(test, test_path),
        test_labels=_labels(test, "labels", test_path),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )


def load_cifar100(root: Path, *, download: bool = False, image_size: int | None = None) -> DataBundle:
    """CIFAR-100: 50,000 train / 10,000 test 32×32 images, 100 fine classes, 20 superclasses kept for asym noise."""
    check_native_size("cifar100", CIFAR_SIZE, image_size)
    folder = root / CIFAR100_DIR
    _prepare(
        "cifar100", root, folder, CIFAR100_FILES, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", download
    )
    train_path, test_path, meta_path = (folder / f for f in CIFAR100_FILES)
    train, test = read_pickle(train_path), read_pickle(test_path)
    classes = [_text(c) for c in _field(read_pickle(meta_path), "fine_label_names", meta_path)]
    return DataBundle(
        name="cifar100",
        classes=classes,
        image_size=CIFAR_SIZE,
        train_images=_images(train, train_path),
        train_labels=_labels(train, "fine_labels", train_path),
        test_images=_images(test, test_path),
        test_labels=_labels(test, "fine_labels", test_path),
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        train_coarse_labels=_labels(train, "coarse_labels", train_path),
    )
