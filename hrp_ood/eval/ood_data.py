"""OOD test sets (SPEC §4): find a set on disk, decode it, apply the eval transform, return uint8 images.

A set name is resolved, first match wins, as

1. `ood_dirs[name]` — any image folder, searched recursively (`--ood-dir NAME=PATH`);
2. OpenOOD's layout — `<data_root>/benchmark_imglist/<id_dataset>/test_<name>.txt`, one
   "relative/path label" line per image, paths relative to `<data_root>/images_classic/`;
3. plain formats under `data_root` — SVHN's `svhn/test_32x32.mat`, MNIST's idx files in torchvision's
   `MNIST/raw/` layout, the CIFAR pickles (near-OOD), or an image folder (`dtd/images/`, `LSUN/`, …).

With an OpenOOD benchmark (`--benchmark`, `hrp_ood.data.benchmarks`) a set is that benchmark's own list
(step 2 with its list name and image folder) unless `ood_dirs` names it; nothing else is looked at.

Every image goes through OpenOOD's test transform without its normalisation: RGB (grey → 3 channels,
alpha dropped, 16-bit and float images scaled to 8 bits: `hrp_ood.data.image_modes`), resize the shorter
side to `pre_size` (default `image_size`; bilinear, antialiased), centre-crop `image_size`. The ID mean/std
is applied later, on the batch, on the device (`features.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from hrp_ood.data.fetch import fetch_hint
from hrp_ood.data.idx import read_mnist_idx
from hrp_ood.data.image_lists import list_files, load_image_list
from hrp_ood.data.images import decode_images, folder_images
from hrp_ood.data.sources import ImageSource, files_under
from hrp_ood.errors import UserError, shown

if TYPE_CHECKING:
    from hrp_ood.data.benchmarks import Benchmark

log = logging.getLogger(__name__)

FAR_OOD_SETS = ("svhn", "lsun", "places365", "textures", "mnist")
NEAR_OOD_SETS = ("cifar10", "cifar100", "tin")

# OpenOOD's image-list file stem per set; LSUN is not in OpenOOD v1.5's lists, so test_lsun.txt is ours.
OPENOOD_LIST_STEMS = {"textures": "texture"}

# Image folders under data_root tried for each set after the set's own name (`<data_root>/<name>/`).
FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "textures": ("dtd/images", "dtd"),
    "lsun": ("LSUN", "LSUN_resize"),
    "places365": ("Places365",),
    "tin": ("TinyImageNet", "tiny-imagenet-200/test"),
}

# The CIFAR pickle folders `hrp_ood.data.load_dataset` reads (torchvision's names).
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


Loader = Callable[[], torch.Tensor]


class Candidate(NamedTuple):
    """A place that could hold an OOD set: `path` (exists when it does), how to decode the set from it, and the
    files the set is then read from (their stat names the set without decoding it: `hrp_ood.data.sources`)."""

    path: Path
    load: Loader
    files: Callable[[], list[Path]]


def load_ood_images(
    name: str,
    data_root: str | Path,
    *,
    id_dataset: str,
    image_size: int = 32,
    ood_dirs: dict[str, Path] | None = None,
    skip_corrupt: bool = False,
    benchmark: Benchmark | None = None,
) -> torch.Tensor:
    """The OOD set `name` as uint8 images (N, 3, image_size, image_size), eval-transformed (module docstring)."""
    return ood_source(
        name,
        data_root,
        id_dataset=id_dataset,
        image_size=image_size,
        ood_dirs=ood_dirs,
        skip_corrupt=skip_corrupt,
        benchmark=benchmark,
    ).images


def ood_source(
    name: str,
    data_root: str | Path,
    *,
    id_dataset: str,
    image_size: int = 32,
    ood_dirs: dict[str, Path] | None = None,
    skip_corrupt: bool = False,
    benchmark: Benchmark | None = None,
) -> ImageSource:
    """The OOD set `name`, found on disk but not decoded yet: `load_ood_images`'s set as an `ImageSource`."""
    if name == (benchmark.name if benchmark else id_dataset):
        raise UserError(f"OOD set {name!r} is the ID dataset itself; choose another set in --ood")
    data_root = Path(data_root)
    if benchmark is not None and name not in (ood_dirs or {}):
        candidates = [_benchmark_candidate(benchmark, name, data_root, skip_corrupt)]
    else:
        candidates = _candidates(name, data_root, id_dataset, image_size, ood_dirs or {}, skip_corrupt)
    for candidate in candidates:
        if candidate.path.exists():
            recipe = (
                f"OOD set {name} from {candidate.path}: size {image_size}, benchmark "
                f"{benchmark.name if benchmark else None}, skip_corrupt {skip_corrupt}"
            )
            return ImageSource.from_files(recipe, candidate.files(), lambda: _decoded(name, candidate))
    looked = ", ".join(shown(candidate.path) for candidate in candidates)
    openood_root = benchmark is None and (data_root / "benchmark_imglist").is_dir()
    raise UserError(
        f"OOD set {name!r} not found; looked for: {looked}; download it there, give "
        f"--ood-dir {name}=PATH, or pass --skip-missing"
        + fetch_hint(name, data_root, benchmark.name if benchmark else None)
        + ("; to read this OpenOOD root as one of its benchmarks, give --benchmark NAME" if openood_root else "")
    )


def _decoded(name: str, candidate: Candidate) -> torch.Tensor:
    images = candidate.load()
    if len(images) == 0:
        raise UserError(
            f"OOD set {name!r} at {shown(candidate.path)} holds no images; point --data-root/--ood-dir "
            f"at the images or drop {name} from --ood"
        )
    log.info("OOD set %s: %d images from %s", name, len(images), candidate.path)
    return images


def _candidates(
    name: str, data_root: Path, id_dataset: str, size: int, ood_dirs: dict[str, Path], skip_corrupt: bool
) -> list[Candidate]:
    """Every candidate place of set `name`, in resolution order."""

    def folder(path: Path) -> Candidate:
        return Candidate(
            path, lambda: load_image_folder(path, size, skip_corrupt=skip_corrupt), lambda: folder_images(path)
        )

    def file(path: Path, load: Loader) -> Candidate:
        return Candidate(path, load, lambda: files_under(path))

    if name in ood_dirs:  # given explicitly: the only place to look
        path = Path(ood_dirs[name])
        if path.exists() and not path.is_dir():
            raise UserError(f"--ood-dir {name}={shown(path)} is not a folder; give a folder of images")
        if not path.exists():  # named by the user: an error even with --skip-missing, never a skipped set
            raise UserError(f"--ood-dir {name}={shown(path)}: no such folder; give the folder of the {name} images")
        return [folder(path)]
    stem = OPENOOD_LIST_STEMS.get(name, name)
    image_list = data_root / "benchmark_imglist" / id_dataset / f"test_{stem}.txt"
    images_root = data_root / "images_classic"
    found = [
        Candidate(
            image_list,
            lambda: load_image_list(image_list, images_root, size, skip_corrupt=skip_corrupt),
            lambda: list_files(image_list, images_root),
        )
    ]
    if name == "svhn":
        mat = data_root / "svhn" / "test_32x32.mat"
        found.append(file(mat, lambda: eval_transform_batch(read_svhn_mat(mat), size)))
    if name == "mnist":
        raw = data_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
        for idx in (raw, raw.with_name(raw.name + ".gz")):
            found.append(file(idx, lambda idx=idx: eval_transform_batch(read_mnist_idx(idx), size)))
    if name in CIFAR_FOLDERS:
        found.append(file(data_root / CIFAR_FOLDERS[name], lambda: _cifar_test_images(name, data_root, size)))
    found += [folder(data_root / sub) for sub in (name, *FOLDER_ALIASES.get(name, ()))]
    return found


def _benchmark_candidate(benchmark: Benchmark, name: str, data_root: Path, skip_corrupt: bool) -> Candidate:
    """The list file of OOD set `name` of an OpenOOD benchmark, decoded with the benchmark's preprocessing."""
    list_file, images_root = benchmark.ood_list(name, data_root)
    return Candidate(
        list_file,
        lambda: load_image_list(
            list_file, images_root, benchmark.img_size, pre_size=benchmark.pre_size, skip_corrupt=skip_corrupt
        ),
        lambda: list_files(list_file, images_root),
    )


# ---------------------------------------------------------------------------------------------- formats


def read_svhn_mat(path: Path) -> torch.Tensor:
    """SVHN's `test_32x32.mat`: X is (32, 32, 3, N) uint8 → (N, 3, 32, 32)."""
    from scipy.io import loadmat

    try:
        x = loadmat(path, variable_names=["X"])["X"]
    except (ValueError, KeyError, OSError, TypeError) as err:
        raise UserError(f"{path} is not SVHN's test_32x32.mat ({err}); download it again") from None
    if x.ndim != 4 or x.shape[2] != 3:
        raise UserError(f"{path}: X has shape {x.shape}, expected (32, 32, 3, N) as in SVHN's test_32x32.mat")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8))


def _cifar_test_images(name: str, data_root: Path, size: int) -> torch.Tensor:
    from hrp_ood.data import load_dataset

    return eval_transform_batch(load_dataset(name, data_root).test_images, size)


def load_image_folder(
    folder: Path, size: int, *, pre_size: int | None = None, skip_corrupt: bool = False
) -> torch.Tensor:
    """Every image file under `folder` (recursive, sorted by path), eval-transformed."""
    return decode_images(folder_images(folder), size, pre_size=pre_size, skip_corrupt=skip_corrupt)


# ---------------------------------------------------------------------------------------------- transform


def eval_transform_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """The eval transform on a uint8 batch (N, 1|3, H, W): grey → RGB, shorter side → size, centre-crop."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if min(images.shape[-2:]) != size:
        images = TF.resize(images, size, antialias=True)
    return TF.center_crop(images, size).contiguous()
