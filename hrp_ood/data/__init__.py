"""Datasets, label noise, the clean meta set and batched augmentation (SPEC §2)."""

from hrp_ood.data.bundle import DataBundle
from hrp_ood.data.datasets import DATASETS, load_dataset

__all__ = ["DATASETS", "DataBundle", "load_dataset"]
