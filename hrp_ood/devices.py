"""Device names → torch devices, for training and evaluation alike."""

from __future__ import annotations

import torch

from hrp_ood import distributed
from hrp_ood.config import check_device_name
from hrp_ood.errors import UserError


def resolve_device(name: str) -> torch.device:
    """The training device; in a data-parallel run on CUDA, this rank's GPU (torchrun's LOCAL_RANK)."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if name.startswith("cuda") and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def device_type(name: str) -> str:
    """'cuda' or 'cpu' for a config's device name (before any process group exists)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"
