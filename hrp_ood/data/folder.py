"""Datasets stored as image files: a generic class-per-folder tree, and Animal-10N (SPEC §2).

    folder:    root/train/<class>/*.jpg|png|…   root/test/<class>/*   (classes sorted alphabetically)
    animal10n: root/training/<label>_<id>.jpg   root/testing/<label>_<id>.jpg   (or train/ and test/)

Images are decoded and resized by `hrp_ood.data.images`, the decoder and eval transform of the OOD sets too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from hrp_ood.data import images
from hrp_ood.data.bundle import DataBundle, channel_stats, reject_download
from hrp_ood.data.images import IMAGE_EXTENSIONS, list_images
from hrp_ood.errors import UserError, shown

log = logging.getLogger(__name__)

ANIMAL10N_CLASSES = [
    "cat",
    "lynx",
    "wolf",
    "coyote",
    "cheetah",
    "jaguar",
    "chimpanzee",
    "orangutan",
    "hamster",
    "guinea pig",
]
ANIMAL10N_SIZE = 64
MIN_INFERRED_SIZE = 8  # smaller first images are a stray file, not the dataset's size
ANIMAL10N_URL = "https://dm.kaist.ac.kr/datasets/animal-10n/"  # the authors' request form


def decode_all(paths: list[Path], size: int) -> torch.Tensor:
    """Decode `paths` into one uint8 tensor (N, 3, size, size): shorter side → size, centre crop."""
    return images.decode_images(paths, size, unreadable_hint="delete or replace the file")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise UserError(
            f"{what} not found: expected the folder {shown(path)}; point --data-root at the folder that "
            "holds train/<class>/ and test/<class>/"
        )


def _class_files(split_dir: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths: list[Path] = []
    labels: list[np.ndarray] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        files = list_images(class_dir) if class_dir.is_dir() else []
        paths += files
        labels.append(np.full(len(files), label, dtype=np.int64))
    return paths, np.concatenate(labels)


def load_image_folder(root: Path, *, download: bool = False, image_size: int | None = None) -> DataBundle:
    """An ImageFolder-style tree: root/train/<class>/* and root/test/<class>/*.

    Classes are the sub-folders of root/train, sorted alphabetically (label = position). Every image
    is resized (shorter side, then centre crop) to image_size, or to the shorter side of the first
    training image when image_size is None. Mean/std are measured on the training images.
    """
    reject_download("folder", root, download)
    train_dir, test_dir = root / "train", root / "test"
    _require_dir(train_dir, "image-folder training split (root/train/<class>/*)")
    _require_dir(test_dir, "image-folder test split (root/test/<class>/*)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{train_dir} has no class sub-folders; expected {train_dir}/<class>/<image files>")
    unknown = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise UserError(
            f"{test_dir} has classes with no training folder: {', '.join(unknown)}; "
            f"add them under {train_dir} or remove them"
        )
    train_paths, train_labels = _class_files(train_dir, classes)
    empty = [name for label, name in enumerate(classes) if not np.any(train_labels == label)]
    if empty:
        raise UserError(
            f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in training class folder(s) "
            f"{', '.join(str(train_dir / c) for c in empty)}"
        )
    test_paths, test_labels = _class_files(test_dir, classes)
    if not test_paths:
        raise UserError(f"no test images under {test_dir}/<class>/; add some (any class from {train_dir})")
    size = image_size or images.shorter_side(train_paths[0])
    if size < MIN_INFERRED_SIZE:
        raise UserError(
            f"the first training image {shown(train_paths[0])} is {size} px on its shorter side, which would be the "
            f"size of every image; give the size to train at with --set image_size=N (e.g. 32)"
        )
    return _bundle("folder", classes, size, train_paths, train_labels, test_paths, test_labels)


def _pick_dir(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise UserError(
        f"Animal-10N {what} split not found: expected {' or '.join(shown(root / n) for n in names)} "
        f"holding <label>_<id>.jpg files; point --data-root at the extracted Animal-10N release "
        f"({ANIMAL10N_URL})"
    )


def animal10n_label(path: Path) -> int:
    """The class encoded in an Animal-10N file name: `<label>_<id>.jpg` with label in 0–9."""
    prefix = path.stem.split("_", 1)[0]
    if not (prefix.isascii() and prefix.isdigit()) or int(prefix) >= len(ANIMAL10N_CLASSES):
        raise UserError(
            f"Animal-10N file name {path.name!r} does not start with a label 0-9 and '_' "
            f"(expected <label>_<id>.jpg); remove or rename it"
        )
    return int(prefix)


def _animal10n_split(folder: Path) -> tuple[list[Path], np.ndarray]:
    paths = list_images(folder)
    if not paths:
        raise UserError(f"no Animal-10N images (<label>_<id>.jpg) in {folder}")
    return paths, np.array([animal10n_label(p) for p in paths], dtype=np.int64)


def load_animal10n(root: Path, *, download: bool = False, image_size: int | None = None) -> DataBundle:
    """Animal-10N: 50,000 train / 5,000 test 64×64 images whose shipped training labels carry ≈8% real noise."""
    reject_download("animal10n", root, download)
    train_paths, train_labels = _animal10n_split(_pick_dir(root, ("training", "train"), "training"))
    test_paths, test_labels = _animal10n_split(_pick_dir(root, ("testing", "test"), "test"))
    return _bundle(
        "animal10n",
        list(ANIMAL10N_CLASSES),
        image_size or ANIMAL10N_SIZE,
        train_paths,
        train_labels,
        test_paths,
        test_labels,
    )


def _bundle(
    name: str,
    classes: list[str],
    size: int,
    train_paths: list[Path],
    train_labels: np.ndarray,
    test_paths: list[Path],
    test_labels: np.ndarray,
) -> DataBundle:
    start = time.perf_counter()
    train_images = decode_all(train_paths, size)
    test_images = decode_all(test_paths, size)
    log.info(
        "%s: decoded %d images at %dx%d in %.1f s",
        name,
        len(train_paths) + len(test_paths),
        size,
        size,
        time.perf_counter() - start,
    )
    mean, std = channel_stats(train_images)
    return DataBundle(
        name=name,
        classes=classes,
        image_size=size,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        mean=mean,
        std=std,
    )
