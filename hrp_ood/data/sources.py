"""Images named before they are decoded: what lets a warm feature cache evaluate without reading an image.

An `ImageSource` holds how to decode a set (`load`, run at most once, on first use of `.images`) and a `stamp`:
the sha256 of how the pixels are made (`recipe`: loader, size, transform, decoder versions) and of the path,
size and modification time of every file they are read from. A stamp costs one stat() per file. The feature
cache (`hrp_ood.eval.features`) keeps the stamp beside the pixel fingerprint it computed once; the same stamp
later stands for the same pixels, and any other stamp is checked against the decoded pixels, which stay the
authority.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch


def files_under(path: Path) -> list[Path]:
    """Every file under the folder `path` (recursive, sorted), `[path]` for a file, [] when there is none."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.is_file() else []


@functools.cache
def decoder_versions() -> str:
    """The libraries whose decoders and resizing make the pixels: a new version may make other ones."""
    import PIL
    import torchvision

    return f"torch {torch.__version__} torchvision {torchvision.__version__} pillow {PIL.__version__}"


def files_stamp(recipe: str, files: Iterable[Path]) -> str:
    """sha256 of `recipe`, the decoder versions and (path, size, mtime in ns) of every file, in the order given."""
    digest = hashlib.sha256(f"{recipe}\n{decoder_versions()}\n".encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(eq=False)
class ImageSource:
    """uint8 images (N, 3, H, W) decoded on first use of `.images`; `stamp` names them without decoding."""

    stamp: str
    load: Callable[[], torch.Tensor] = field(repr=False)

    @classmethod
    def from_files(cls, recipe: str, files: Iterable[Path], load: Callable[[], torch.Tensor]) -> ImageSource:
        return cls(files_stamp(recipe, files), load)

    @functools.cached_property
    def images(self) -> torch.Tensor:
        return self.load()

    def subset(self, picked: torch.Tensor, tag: str) -> ImageSource:
        """The images at `picked`, named by this stamp and `tag` (which must name `picked`)."""
        stamp = hashlib.sha256(f"{self.stamp}\0{tag}".encode()).hexdigest()
        return ImageSource(stamp, lambda: self.images[picked])


def pixels(images: torch.Tensor | ImageSource) -> torch.Tensor:
    """The decoded images of a source (decoding them now if needed), a tensor as it is."""
    return images.images if isinstance(images, ImageSource) else images


def select(images: torch.Tensor | ImageSource, picked: torch.Tensor, tag: str) -> torch.Tensor | ImageSource:
    """The images at `picked` of a tensor or a source (still not decoded); `tag` must name `picked`."""
    return images.subset(picked, tag) if isinstance(images, ImageSource) else images[picked]
