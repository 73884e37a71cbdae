"""MNIST's idx files (the raw format of its distribution and of torchvision's `MNIST/raw`)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from hrp_ood.errors import UserError

MNIST_IMAGES_MAGIC = 0x00000803  # idx3-ubyte: unsigned bytes, 3 dimensions


def read_mnist_idx(path: Path) -> torch.Tensor:
    """MNIST's idx3-ubyte file (optionally .gz): big-endian header magic, N, rows, cols → (N, 1, rows, cols)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"{path} cannot be read ({err}); download MNIST again") from None
    header = np.frombuffer(data[:16], dtype=">u4") if len(data) >= 16 else np.zeros(0)
    if len(header) != 4 or header[0] != MNIST_IMAGES_MAGIC:
        raise UserError(f"{path} is not an idx3-ubyte image file (bad magic number); download MNIST again")
    n, rows, cols = (int(v) for v in header[1:])
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16)
    if pixels.size != n * rows * cols:
        raise UserError(
            f"{path} is truncated: {pixels.size} pixels for {n} images of {rows}x{cols}; download MNIST again"
        )
    return torch.from_numpy(pixels.reshape(n, 1, rows, cols).copy())
