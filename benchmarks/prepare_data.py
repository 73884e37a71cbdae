"""Image folders for the CPU benchmarks, made once from the real data of the project's shared folder.

    python benchmarks/prepare_data.py mnist --out /work/data/mnist_premise
    python benchmarks/prepare_data.py cifar10-gray --out /work/data/cifar10_gray_test

`mnist`: MNIST's 10,000-image test set (idx files, torchvision's `MNIST/raw` layout) split by a fixed seed into
`train/<digit>/` (the first `--train` images of a seeded permutation) and `test/<digit>/` (the rest), as PNGs:
the image-folder layout `hrp-ood train --set dataset=folder` reads. `cifar10-gray`: CIFAR-10's test images
(the JPEG copy) as single-channel PNGs, an OOD set for a network trained on MNIST that differs from it in
content, not in colour.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from hrp_ood.eval.ood_data import read_mnist_idx

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_mnist_labels(path: Path) -> np.ndarray:
    import gzip

    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if int.from_bytes(raw[:4], "big") != 0x00000801:
        sys.exit(f"prepare_data: {path} is not an idx1-ubyte label file")
    return np.frombuffer(raw[8:], dtype=np.uint8).astype(np.int64)


def prepare_mnist(source: Path, out: Path, train: int, seed: int) -> None:
    images = read_mnist_idx(source / "t10k-images-idx3-ubyte.gz")[:, 0].numpy()
    labels = read_mnist_labels(source / "t10k-labels-idx1-ubyte.gz")
    order = np.random.default_rng(seed).permutation(len(labels))
    for split, picked in (("train", order[:train]), ("test", order[train:])):
        for i in picked:
            folder = out / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")


def prepare_cifar10_gray(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source) as tar:
        for member in tar:
            if member.isfile() and "/test/" in f"/{member.name}":
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L")
                image.save(out / (member.name.replace("/", "_").rsplit(".", 1)[0] + ".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["mnist", "cifar10-gray"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", type=Path, help="default: the shared folder's copy")
    parser.add_argument("--train", type=int, default=5000, help="mnist: images in train/ (the rest is test/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.out / ".complete").exists():
        print(f"{args.out} is already prepared")
        return
    if args.what == "mnist":
        prepare_mnist(args.source or SHARED / "MNIST" / "raw", args.out, args.train, args.seed)
    else:
        prepare_cifar10_gray(args.source or SHARED / "cifar10-jpeg.tar.gz", args.out)
    (args.out / ".complete").touch()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
