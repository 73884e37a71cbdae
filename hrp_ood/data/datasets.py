"""The dataset registry: `load_dataset(name, root)` for every format the package reads (SPEC §2)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from hrp_ood.data.bundle import DataBundle
from hrp_ood.data.cifar import load_cifar10, load_cifar100
from hrp_ood.data.digits import load_digits_dataset
from hrp_ood.data.folder import load_animal10n, load_image_folder
from hrp_ood.errors import UserError

# Every loader has the signature (root: Path, *, download: bool, image_size: int | None) -> DataBundle.
LOADERS: dict[str, Callable[..., DataBundle]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "animal10n": load_animal10n,
    "folder": load_image_folder,
    "digits": load_digits_dataset,
}
DATASETS = tuple(LOADERS)


def load_dataset(name: str, root: str | Path = "./data", *, download: bool = False,
                 image_size: int | None = None) -> DataBundle:
    """Load dataset `name` (one of DATASETS) from `root` into memory.

    download: fetch CIFAR into `root` with torchvision when its pickles are missing (CIFAR only).
    image_size: resize every image to image_size × image_size (image folders and Animal-10N; the
    fixed-size datasets accept only their native size).
    """
    if name not in LOADERS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None and image_size <= 0:
        raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
    return LOADERS[name](Path(root).expanduser(), download=download, image_size=image_size)
