"""The dataset registry: `load_dataset(name, root)` for every format the package reads (SPEC §2)."""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from hrp_ood.data.bundle import DataBundle
from hrp_ood.data.cifar import CIFAR10_DIR, CIFAR100_DIR, load_cifar10, load_cifar100
from hrp_ood.data.digits import load_digits_dataset
from hrp_ood.data.folder import load_animal10n, load_image_folder
from hrp_ood.data.sources import ImageSource, files_stamp, files_under
from hrp_ood.errors import UserError
from hrp_ood.io import atomic_write

# Every loader has the signature (root: Path, *, download: bool, image_size: int | None) -> DataBundle.
LOADERS: dict[str, Callable[..., DataBundle]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "animal10n": load_animal10n,
    "folder": load_image_folder,
    "digits": load_digits_dataset,
}
DATASETS = tuple(LOADERS)
# Where under the root each dataset's files are (digits has none: scikit-learn ships it).
DATASET_FOLDERS = {"cifar10": CIFAR10_DIR, "cifar100": CIFAR100_DIR, "animal10n": ".", "folder": "."}


def load_dataset(
    name: str, root: str | Path = "./data", *, download: bool = False, image_size: int | None = None
) -> DataBundle:
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


def dataset_files(name: str, root: Path) -> list[Path]:
    """Every file `load_dataset(name, root)` may read (a superset: the dataset's whole folder)."""
    return files_under(root / DATASET_FOLDERS[name]) if name in DATASET_FOLDERS else []


def load_dataset_lazily(
    name: str, root: str | Path, *, image_size: int, memo_dir: Path
) -> tuple[DataBundle, Callable[[], None]]:
    """`load_dataset`'s bundle with its images as `ImageSource`s, and a call that remembers the bundle.

    Remembered are classes, labels and mean/std, in `<memo_dir>/dataset-<stamp>.npz`, the stamp naming the
    dataset's files by path, size and modification time: while they are unchanged, the next call reads nothing
    but that file and decodes the images only when they are used. Without a memo the images are decoded now.
    """
    import sklearn

    root = Path(root).expanduser()
    recipe = f"dataset {name} at {root.absolute()}, size {image_size}, sklearn {sklearn.__version__}"
    stamp = files_stamp(recipe, dataset_files(name, root))
    full = functools.cache(lambda: load_dataset(name, root, image_size=image_size))
    memo = memo_dir / f"dataset-{stamp[:32]}.npz"
    remembered = _read_memo(memo)
    fields = remembered or _memo_fields(full())

    def remember() -> None:
        if remembered is None:
            atomic_write(memo, lambda f: np.savez(f, **fields))

    bundle = DataBundle(
        name=name,
        classes=[str(c) for c in fields["classes"]],
        image_size=int(fields["image_size"]),
        train_images=ImageSource(f"{stamp}-train", lambda: full().train_images),
        train_labels=fields["train_labels"],
        test_images=ImageSource(f"{stamp}-test", lambda: full().test_images),
        test_labels=fields["test_labels"],
        mean=tuple(fields["mean"].tolist()),
        std=tuple(fields["std"].tolist()),
        train_coarse_labels=fields.get("train_coarse_labels"),
    )
    return bundle, remember


MEMO_FIELDS = ("classes", "image_size", "train_labels", "test_labels", "mean", "std", "train_coarse_labels")


def _memo_fields(bundle: DataBundle) -> dict[str, np.ndarray]:
    return {key: np.asarray(getattr(bundle, key)) for key in MEMO_FIELDS if getattr(bundle, key) is not None}


def _read_memo(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a memo (None when there is no readable one)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
