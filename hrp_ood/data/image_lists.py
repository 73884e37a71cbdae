"""OpenOOD's image lists: "relative/path label" per line under an images folder (benchmark_imglist/<id>/*.txt),
read for the OOD sets and the ID splits of an OpenOOD benchmark alike."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from hrp_ood.data.images import decode_each, decode_images
from hrp_ood.errors import UserError
from hrp_ood.io import read_text_file


def list_files(list_file: Path, images_root: Path) -> list[Path]:
    """An OpenOOD list and the images it lists: the files its set is read from."""
    return [list_file, *(path for path, _ in _list_entries(list_file, images_root))]


def load_image_list(
    list_file: Path, images_root: Path, size: int, *, pre_size: int | None = None, skip_corrupt: bool = False
) -> torch.Tensor:
    """OpenOOD image list: the first token of every non-empty line is a path relative to `images_root`."""
    paths = [path for path, _ in _list_entries(list_file, images_root)]
    return decode_images(paths, size, pre_size=pre_size, skip_corrupt=skip_corrupt)


def load_labelled_image_list(
    list_file: Path,
    images_root: Path,
    size: int,
    num_classes: int,
    *,
    pre_size: int | None = None,
    skip_corrupt: bool = False,
) -> tuple[torch.Tensor, np.ndarray]:
    """(images, int64 labels) of an OpenOOD ID list: "relative/path label" per line, label in [0, num_classes)."""
    entries = _list_entries(list_file, images_root)
    labels = [_class_label(label, num_classes, list_file, k) for k, (_, label) in enumerate(entries, start=1)]
    decoded = decode_each([path for path, _ in entries], size, pre_size, skip_corrupt)
    kept = [k for k, image in enumerate(decoded) if image is not None]
    images = torch.stack([decoded[k] for k in kept]) if kept else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return images, np.asarray([labels[k] for k in kept], dtype=np.int64)


def _list_entries(list_file: Path, images_root: Path) -> list[tuple[Path, str]]:
    """(image path, label token or "") per non-empty line of an OpenOOD list; every image must exist."""
    lines = [line.split(maxsplit=1) for line in read_text_file(list_file, "image list").splitlines() if line.strip()]
    entries = [
        (_inside(images_root, parts[0], list_file), parts[1].strip() if len(parts) > 1 else "") for parts in lines
    ]
    missing = [path for path, _ in entries if not path.is_file()]
    if missing:
        raise UserError(
            f"{list_file} lists {len(missing)} image(s) missing under {images_root}, first: "
            f"{missing[0]}; download the images (OpenOOD's {images_root.name}) or fix --data-root"
        )
    return entries


def _class_label(token: str, num_classes: int, list_file: Path, line: int) -> int:
    if not (token.isascii() and token.isdigit()) or int(token) >= num_classes:
        raise UserError(
            f"{list_file} line {line}: label {token!r} is not a class index 0-{num_classes - 1}; "
            "use the benchmark's own ID lists"
        )
    return int(token)


def _inside(root: Path, relative: str, list_file: Path) -> Path:
    """`root / relative`, refusing paths that leave `root` (absolute or `..`).

    The check is lexical (normpath), not `resolve()`: a data root made of symlinks to other disks is
    legitimate, a list entry climbing out of it is not.
    """
    joined = os.path.normpath(os.path.join(root, relative))
    base = os.path.normpath(root)
    if os.path.isabs(relative) or os.path.commonpath([base, joined]) != base:
        raise UserError(
            f"{list_file} lists {relative!r}, which is outside {root}; image lists must hold "
            "paths relative to the images folder"
        )
    return Path(joined)
