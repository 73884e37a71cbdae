"""OpenOOD v1.5's benchmarks (`hrp-ood evaluate --benchmark NAME`): their lists, class counts, preprocessing.

An OpenOOD root holds `benchmark_imglist/<benchmark>/<split>_<set>.txt` lists ("relative/path label" per
line) over `images_classic/` or `images_largescale/`. Naming the benchmark lets any checkpoint (one
trained on an image folder, say) be evaluated on that benchmark's ID train/val/test and OOD lists, with
the benchmark's own test transform and normalisation, as OpenOOD's `Evaluator` does with its default
preprocessor. The tables are OpenOOD's: `openood/evaluation_api/datasets.py` (`DATA_INFO`: lists, class
counts, near/far sets, OOD-val) and `openood/evaluation_api/preprocessor.py` (`default_preprocessing_dict`:
Resize(pre_size) bilinear, CenterCrop(img_size), Normalize(mean, std)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hrp_ood.data import DataBundle
from hrp_ood.errors import UserError, shown

CLASSIC, LARGESCALE = "images_classic", "images_largescale"
IMAGENET_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Benchmark:
    """One OpenOOD benchmark. Sets map our OOD set name → (list file, images folder)."""

    name: str
    num_classes: int
    pre_size: int
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    images_dir: str
    ood_val: tuple[str, str]
    near: dict[str, tuple[str, str]] = field(default_factory=dict)
    far: dict[str, tuple[str, str]] = field(default_factory=dict)

    def list_path(self, data_root: Path, list_name: str) -> Path:
        return Path(data_root) / "benchmark_imglist" / self.name / list_name

    def id_list(self, split: str, data_root: Path) -> tuple[Path, Path]:
        """(list file, images folder) of the ID split "train", "val" or "test"."""
        return self.list_path(data_root, f"{split}_{self.name}.txt"), Path(data_root) / self.images_dir

    def ood_val_list(self, data_root: Path) -> tuple[Path, Path]:
        """(list file, images folder) of the OOD-val set OpenOOD tunes on."""
        return self.list_path(data_root, self.ood_val[0]), Path(data_root) / self.ood_val[1]

    def ood_list(self, name: str, data_root: Path) -> tuple[Path, Path]:
        """(list file, images folder) of OOD test set `name`; UserError for a set the benchmark does not have."""
        sets = {**self.near, **self.far}
        if name not in sets:
            raise UserError(
                f"OOD set {name!r} is not part of OpenOOD's {self.name} benchmark (it has "
                f"{', '.join(sets)}); give it as --ood-dir {name}=PATH"
            )
        list_name, images_dir = sets[name]
        return self.list_path(data_root, list_name), Path(data_root) / images_dir

    @property
    def preprocessing(self) -> dict[str, object]:
        return {
            "source": f"openood:{self.name}",
            "resize": self.pre_size,
            "crop": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def _classic(**lists: str) -> dict[str, tuple[str, str]]:
    return {name: (list_name, CLASSIC) for name, list_name in lists.items()}


def _largescale(**lists: str) -> dict[str, tuple[str, str]]:
    return {name: (list_name, LARGESCALE) for name, list_name in lists.items()}


CIFAR_FAR = _classic(
    mnist="test_mnist.txt", svhn="test_svhn.txt", textures="test_texture.txt", places365="test_places365.txt"
)
IMAGENET_NEAR = _largescale(ssb_hard="test_ssb_hard.txt", ninco="test_ninco.txt")
IMAGENET_FAR = {
    **_largescale(inaturalist="test_inaturalist.txt"),
    **_classic(textures="test_textures.txt"),
    **_largescale(openimage_o="test_openimage_o.txt"),
}

BENCHMARKS: dict[str, Benchmark] = {
    "cifar10": Benchmark(
        "cifar10",
        10,
        32,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        CLASSIC,
        ("val_tin.txt", CLASSIC),
        _classic(cifar100="test_cifar100.txt", tin="test_tin.txt"),
        CIFAR_FAR,
    ),
    "cifar100": Benchmark(
        "cifar100",
        100,
        32,
        32,
        (0.5071, 0.4867, 0.4408),
        (0.2675, 0.2565, 0.2761),
        CLASSIC,
        ("val_tin.txt", CLASSIC),
        _classic(cifar10="test_cifar10.txt", tin="test_tin.txt"),
        CIFAR_FAR,
    ),
    "imagenet200": Benchmark(
        "imagenet200",
        200,
        256,
        224,
        *IMAGENET_NORMALISATION,
        LARGESCALE,
        ("val_openimage_o.txt", LARGESCALE),
        IMAGENET_NEAR,
        IMAGENET_FAR,
    ),
    "imagenet": Benchmark(
        "imagenet",
        1000,
        256,
        224,
        *IMAGENET_NORMALISATION,
        LARGESCALE,
        ("val_openimage_o.txt", LARGESCALE),
        IMAGENET_NEAR,
        IMAGENET_FAR,
    ),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise UserError(f"unknown OpenOOD benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def check_checkpoint_fits(benchmark: Benchmark, classes: list[str], image_size: int, ckpt: Path) -> None:
    """The network must classify the benchmark's classes at the benchmark's image size."""
    if len(classes) != benchmark.num_classes:
        raise UserError(
            f"{ckpt} classifies {len(classes)} classes but OpenOOD's {benchmark.name} benchmark has "
            f"{benchmark.num_classes}; choose the benchmark the network was trained for"
        )
    if image_size != benchmark.img_size:
        raise UserError(
            f"{ckpt} was trained on {image_size}x{image_size} images but OpenOOD's {benchmark.name} "
            f"benchmark feeds {benchmark.img_size}x{benchmark.img_size}; choose the benchmark the network "
            "was trained for"
        )


def load_benchmark_id_data(
    benchmark: Benchmark, data_root: Path, classes: list[str], *, skip_corrupt: bool = False
) -> DataBundle:
    """ID train and test of `benchmark` from its lists, with its preprocessing; `classes` name the label indices."""
    from hrp_ood.data.image_lists import load_labelled_image_list

    splits = {}
    for split in ("train", "test"):
        list_file, images_root = benchmark.id_list(split, data_root)
        if not list_file.is_file():
            raise UserError(
                f"OpenOOD's {benchmark.name} {split} list {shown(list_file)} not found; point "
                "--data-root at an OpenOOD data root (benchmark_imglist/, images_classic/, …)"
            )
        splits[split] = load_labelled_image_list(
            list_file,
            images_root,
            benchmark.img_size,
            benchmark.num_classes,
            pre_size=benchmark.pre_size,
            skip_corrupt=skip_corrupt,
        )
        if len(splits[split][1]) == 0:
            raise UserError(f"{shown(list_file)} holds no readable image; point --data-root at a complete OpenOOD root")
    (train_images, train_labels), (test_images, test_labels) = splits["train"], splits["test"]
    return DataBundle(
        name=f"openood-{benchmark.name}",
        classes=list(classes),
        image_size=benchmark.img_size,
        train_images=train_images,
        train_labels=np.asarray(train_labels),
        test_images=test_images,
        test_labels=np.asarray(test_labels),
        mean=benchmark.mean,
        std=benchmark.std,
    )
