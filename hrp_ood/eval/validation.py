"""The validation split: ID-val and OOD-val images, for OpenOOD's parameter search and ReAct's percentile.

OpenOOD tunes on `benchmark_imglist/<benchmark>/val_<benchmark>.txt` (ID-val) and the benchmark's OOD-val
list (`val_tin.txt` for CIFAR, `val_openimage_o.txt` for ImageNet) and fits ReAct's threshold on ID-val.
Either part may instead be any image folder (`--val-id-dir`, `--val-ood-dir`, searched recursively;
labels are not needed). A folder given explicitly wins over the list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hrp_ood.data.benchmarks import Benchmark
from hrp_ood.data.image_lists import load_image_list
from hrp_ood.errors import UserError, shown
from hrp_ood.eval.ood_data import load_image_folder

PARTS = ("id", "ood")


@dataclass(frozen=True)
class ValidationSource:
    """Where one part of the validation split is: an OpenOOD list over `images_root`, or a folder."""

    path: Path
    images_root: Path | None = None  # set for a list

    def load(self, size: int, pre_size: int | None, skip_corrupt: bool) -> torch.Tensor:
        if self.images_root is None:
            return load_image_folder(self.path, size, pre_size=pre_size, skip_corrupt=skip_corrupt)
        return load_image_list(self.path, self.images_root, size, pre_size=pre_size, skip_corrupt=skip_corrupt)


@dataclass
class ValidationImages:
    """uint8 eval-transformed images of ID-val and OOD-val (None where there is no such part)."""

    id_images: torch.Tensor | None = None
    ood_images: torch.Tensor | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        images = {"id": self.id_images, "ood": self.ood_images}
        return {
            part: {"source": self.sources[part], "images": len(images[part])}
            for part in PARTS
            if images[part] is not None
        }


def find_validation(
    data_root: Path, benchmark: Benchmark | None, id_dir: Path | None = None, ood_dir: Path | None = None
) -> dict[str, ValidationSource]:
    """The validation parts that exist: `id_dir` / `ood_dir` when given (they must be folders), else
    the OpenOOD lists of `benchmark` under `data_root` when present. Nothing is decoded here."""
    found: dict[str, ValidationSource] = {}
    if benchmark is not None:
        for part, (list_file, images_root) in (
            ("id", benchmark.id_list("val", data_root)),
            ("ood", benchmark.ood_val_list(data_root)),
        ):
            if list_file.is_file():
                found[part] = ValidationSource(list_file, images_root)
    for part, folder, flag in (("id", id_dir, "--val-id-dir"), ("ood", ood_dir, "--val-ood-dir")):
        if folder is not None:
            if not Path(folder).is_dir():
                raise UserError(f"{flag} {shown(folder)} is not a folder; give a folder of images")
            found[part] = ValidationSource(Path(folder))
    return found


def require_tuning_split(found: dict[str, ValidationSource], data_root: Path, benchmark: Benchmark | None) -> None:
    """--tune needs both parts; the error names what was looked for."""
    missing = [part for part in PARTS if part not in found]
    if not missing:
        return
    if benchmark is not None:
        lists = {"id": benchmark.id_list("val", data_root)[0], "ood": benchmark.ood_val_list(data_root)[0]}
        looked = "; ".join(f"{part.upper()}-val: {lists[part]} or --val-{part}-dir" for part in missing)
    else:
        looked = "; ".join(f"{part.upper()}-val: --val-{part}-dir" for part in missing)
    raise UserError(f"--tune needs a validation split (OpenOOD tunes on ID-val vs OOD-val); missing {looked}")


def require_both_parts(validation: ValidationImages | None) -> None:
    """OpenOOD's search compares ID-val with OOD-val: both must be there."""
    if validation is None or validation.id_images is None or validation.ood_images is None:
        raise UserError("tuning needs a validation split with both ID-val and OOD-val images")


def load_validation(
    found: dict[str, ValidationSource], size: int, pre_size: int | None = None, *, skip_corrupt: bool = False
) -> ValidationImages | None:
    """Decode the parts in `found` (None when there are none)."""
    if not found:
        return None
    images = {part: source.load(size, pre_size, skip_corrupt) for part, source in found.items()}
    for part, batch in images.items():
        if len(batch) == 0:
            raise UserError(f"the {part.upper()}-val images at {found[part].path} hold no image; fix the path")
    return ValidationImages(
        images.get("id"), images.get("ood"), {part: str(source.path) for part, source in found.items()}
    )
