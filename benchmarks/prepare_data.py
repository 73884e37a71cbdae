"""Image folders for the CPU benchmarks, made once from the real data of the project's shared folder.

    python benchmarks/prepare_data.py mnist --train 2200 --out data/mnist_premise
    python benchmarks/prepare_data.py cifar10-gray --out data/cifar10_gray_test
    python benchmarks/prepare_data.py cifar10 --out data/cifar10_folder [--train-per-class N --test-per-class M]

`mnist`: MNIST's 10,000-image test set (idx files, torchvision's `MNIST/raw` layout) split by a fixed seed into
`train/<digit>/` (the first `--train` images of a seeded permutation) and `test/<digit>/` (the rest), as PNGs:
the image-folder layout `hrp-ood train --set dataset=folder` reads. `cifar10`: the CIFAR-10 JPEG copy (a tarball
or its extracted folder, train/<class>/ and test/<class>/) as that layout, all 60,000 images or a class-balanced
subset drawn by `--seed`. `cifar10-gray`: CIFAR-10's test images
(the JPEG copy) as single-channel PNGs, an OOD set for a network trained on MNIST that differs from it in
content, not in colour.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from hrp_ood.data.idx import read_mnist_idx

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


def _class_files(source: Path) -> dict[tuple[str, str], dict[str, bytes | Path]]:
    """(split, class) → {file name: its bytes (tarball) or path (folder)} of a train/<class>/, test/<class>/ tree."""
    found: dict[tuple[str, str], dict[str, bytes | Path]] = {}
    if source.is_dir():
        for path in sorted(source.glob("*/*/*")):
            if path.parts[-3] in ("train", "test") and path.is_file():
                found.setdefault((path.parts[-3], path.parts[-2]), {})[path.name] = path
        return found
    with tarfile.open(source) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test"):
                found.setdefault((parts[-3], parts[-2]), {})[parts[-1]] = tar.extractfile(member).read()
    return found


def prepare_cifar10(source: Path, out: Path, per_class: dict[str, int | None], seed: int) -> None:
    """The subset draw of the earlier CPU benchmark (train, then test; classes and files sorted; random.Random),
    so a seed gives the images its tables were measured on."""
    rng = random.Random(seed)
    files = _class_files(source)
    if not files:
        sys.exit(f"prepare_data: no train/<class>/ or test/<class>/ images in {source}")
    for split in ("train", "test"):
        for label in sorted(label for s, label in files if s == split):
            named = files[(split, label)]
            names, count = sorted(named), per_class[split]
            if count is not None and count > len(names):
                sys.exit(f"prepare_data: {split}/{label} has {len(names)} images, fewer than {count}")
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for name in sorted(rng.sample(names, count)) if count is not None else names:
                content = named[name]
                (folder / name).write_bytes(content if isinstance(content, bytes) else content.read_bytes())


def prepare_cifar10_gray(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source) as tar:
        for member in tar:
            if member.isfile() and "/test/" in f"/{member.name}":
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L")
                image.save(out / (member.name.replace("/", "_").rsplit(".", 1)[0] + ".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["mnist", "cifar10", "cifar10-gray"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", type=Path, help="default: the shared folder's copy")
    parser.add_argument("--train", type=int, default=5000, help="mnist: images in train/ (the rest is test/)")
    parser.add_argument("--train-per-class", type=int, help="cifar10: images per class in train/ (default all)")
    parser.add_argument("--test-per-class", type=int, help="cifar10: images per class in test/ (default all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.out / ".complete").exists():
        print(f"{args.out} is already prepared")
        return
    if args.what == "mnist":
        prepare_mnist(args.source or SHARED / "MNIST" / "raw", args.out, args.train, args.seed)
    elif args.what == "cifar10":
        prepare_cifar10(
            args.source or SHARED / "cifar10-jpeg.tar.gz",
            args.out,
            {"train": args.train_per_class, "test": args.test_per_class},
            args.seed,
        )
    else:
        prepare_cifar10_gray(args.source or SHARED / "cifar10-jpeg.tar.gz", args.out)
    (args.out / ".complete").touch()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
