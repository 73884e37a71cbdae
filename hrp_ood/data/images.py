"""Image files → uint8 tensors: the one decoder and the one resize of the package, for training folders,
Animal-10N, OOD folders and OpenOOD image lists alike, so a network's ID and OOD images are prepared the same way.

* `IMAGE_EXTENSIONS`: what a folder walk takes (`list_images`: a folder's own files, `folder_images`: recursive).
* `decode_rgb`: torchvision.io (libjpeg-turbo / libpng) and Pillow for what it cannot read (BMP, TIFF, PPM, 16-bit
  PNG, a mislabelled extension). The two give the same pixels (all 2,300 of the CIFAR-10 JPEGs and MNIST PNGs
  compared, 2026-12-02); torchvision's is ~3× faster on small JPEGs. Grey, alpha, 16-bit and float images become
  8-bit RGB by `hrp_ood.data.image_modes`.
* `eval_transform`: OpenOOD's test transform up to ToTensor: shorter side → `pre_size` (Pillow's bilinear,
  antialiased; skipped when it is there already, which Pillow leaves unchanged), centre-crop `size`.
* `decode_images`: both, on a thread pool (the decoders release the GIL), in the order given.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, read_file

from hrp_ood.data.image_modes import rgb_image
from hrp_ood.errors import UserError

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image decoders in favour of torchcodec and warns on every call; a filter set once
# (warnings.catch_warnings is not thread-safe, and the decoding threads raced it)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
PILLOW_ONLY = (".bmp", ".tif", ".tiff", ".ppm", ".pgm")
DECODE_THREADS = min(8, os.cpu_count() or 1)
# A header may claim any size: decoders allocate it before reading a pixel (a 20000x20000 PNG crashed libpng's
# path with SIGSEGV), so the size is read first and anything larger refused
MAX_IMAGE_PIXELS = 100_000_000
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, UnidentifiedImageError, UserError)


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (so the order is the same on every machine); a
    sub-folder is not read, and one warning says how many were left."""
    with os.scandir(folder) as entries:  # scandir knows file types without one stat() per file
        entries = list(entries)
    names = [e.name for e in entries if e.is_file() and is_image_file(e.name)]
    folders = [e.name for e in entries if e.is_dir()]
    if folders:
        log.warning(
            "%s: %d sub-folder(s) not read (e.g. %s): a class folder's images are its own files",
            folder,
            len(folders),
            sorted(folders)[0],
        )
    return [folder / name for name in sorted(names)]


def folder_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, recursive, sorted by path; symbolic links to folders are followed, each
    real folder read once (a link back up the tree is not a loop)."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(root) / name for name in files if is_image_file(name)]
    return sorted(p for p in found if p.is_file())


def _decode_with_pillow(path: Path) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            _refuse_absurd_size(image, path)  # from the header: Pillow reads no pixel on open
            array = np.asarray(rgb_image(image))
    except UNREADABLE as err:
        raise UserError(f"cannot decode image {path} ({err}); delete or replace the file") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_rgb(path: Path) -> torch.Tensor:
    """One image file as a uint8 (3, H, W) RGB tensor (a UserError naming the file when it cannot be read)."""
    if path.suffix.lower() in PILLOW_ONLY:
        return _decode_with_pillow(path)
    _check_size(path)  # torchvision's decoders allocate what the header claims before reading a pixel
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError:  # a mislabelled extension, a variant libjpeg refuses, or no image ops: Pillow's turn
        return _decode_with_pillow(path)
    # a 16-bit PNG decodes to uint16: Pillow's path scales it (image_modes), one rule for every loader
    return image if image.dtype == torch.uint8 else _decode_with_pillow(path)


def _check_size(path: Path) -> None:
    """The image's size from its header alone (Pillow reads no pixel on open), refused when absurd."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            _refuse_absurd_size(image, path)
    except UNREADABLE as err:
        raise UserError(f"cannot decode image {path} ({err}); delete or replace the file") from err


def _refuse_absurd_size(image: Image.Image, path: Path) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise UserError(
            f"image {path} claims {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} this package decodes; "
            "resize or remove it"
        )


def eval_transform(image: torch.Tensor, size: int, pre_size: int | None = None) -> torch.Tensor:
    """OpenOOD's test transform on a uint8 (3, H, W) image: shorter side → pre_size (default size), centre crop."""
    pre_size = pre_size or size
    if min(image.shape[-2:]) != pre_size:
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        image = TF.pil_to_tensor(TF.resize(pil, pre_size))
    return TF.center_crop(image, [size, size]).contiguous()


def decode_images(
    paths: Sequence[Path],
    size: int,
    *,
    pre_size: int | None = None,
    skip_corrupt: bool = False,
    unreadable_hint: str = "replace it or pass --skip-corrupt",
) -> torch.Tensor:
    """Decode and eval-transform `paths` → uint8 (N, 3, size, size), in the order given (unreadable files: see
    `decode_each`)."""
    images = [img for img in decode_each(paths, size, pre_size, skip_corrupt, unreadable_hint) if img is not None]
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    return torch.stack(images)


def decode_each(
    paths: Sequence[Path],
    size: int,
    pre_size: int | None = None,
    skip_corrupt: bool = False,
    unreadable_hint: str = "replace it or pass --skip-corrupt",
) -> list[torch.Tensor | None]:
    """Each path decoded and eval-transformed, on a thread pool (the decoders release the GIL). An unreadable file
    is a UserError with `unreadable_hint`, or (`skip_corrupt`) None, with one warning for all of them."""
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        decoded = list(pool.map(lambda p: _decode_one(p, size, pre_size), paths))
    unreadable = [p for p, img in zip(paths, decoded) if img is None]
    if unreadable and not skip_corrupt:
        raise UserError(f"cannot decode image {unreadable[0]} ({len(unreadable)} unreadable in all); {unreadable_hint}")
    if unreadable:
        log.warning("skipped %d unreadable image(s), first: %s", len(unreadable), unreadable[0])
    return decoded


def _decode_one(path: Path, size: int, pre_size: int | None) -> torch.Tensor | None:
    """One file decoded and eval-transformed; None when it cannot be read."""
    try:
        return eval_transform(decode_rgb(path), size, pre_size)
    except UNREADABLE:
        return None


def shorter_side(path: Path) -> int:
    """The shorter side of an image file, in pixels."""
    return min(decode_rgb(path).shape[-2:])
