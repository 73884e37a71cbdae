"""From an `hrp-ood train` checkpoint to an OpenOOD-style network (net 1, net 2 or their ensemble)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.config import TrainConfig
from hrp_ood.errors import UserError
from hrp_ood.io import atomic_write
from hrp_ood.models import EnsembleNet, create_model, export_state_dict

NET_CHOICES = ("1", "2", "ensemble")


def checkpoint_config(state: dict[str, Any], path: Path) -> TrainConfig:
    try:
        return TrainConfig(**state["config"])
    except (KeyError, TypeError) as err:
        raise UserError(f"{path}: the checkpoint's config does not match this version of hrp-ood ({err})") from None


def networks_from_checkpoint(state: dict[str, Any], path: Path) -> list[nn.Module]:
    """Rebuild every saved network from the checkpoint's own config and load its weights (strictly)."""
    cfg = checkpoint_config(state, path)
    num_classes = len(state["dataset"]["classes"])
    nets = []
    for k, weights in enumerate(state["nets"]):
        net = create_model(cfg.model, num_classes=num_classes)
        try:
            net.load_state_dict(weights)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise UserError(f"{path}: net {k + 1}'s weights do not fit a {cfg.model} with {num_classes} classes "
                            f"({first[:160]})") from None
        nets.append(net.eval())
    return nets


def select_network(nets: list[nn.Module], which: str, path: Path) -> nn.Module:
    if which not in NET_CHOICES:
        raise UserError(f"--net must be one of {', '.join(NET_CHOICES)}, got {which!r}")
    if which == "ensemble":
        return EnsembleNet(nets) if len(nets) > 1 else nets[0]
    k = int(which)
    if k > len(nets):
        raise UserError(f"{path} holds {len(nets)} network(s) (single-network method); use --net 1")
    return nets[k - 1]


def load_network(path: str | Path, which: str = "ensemble",
                 device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(network in eval mode on `device`, checkpoint state) for `hrp-ood evaluate`."""
    path = Path(path)
    state = load_checkpoint(path)
    net = select_network(networks_from_checkpoint(state, path), which, path)
    return net.to(device).eval(), state


def export_checkpoint(path: Path, out: Path, net: str = "1") -> Path:
    """A plain state dict of one network; for resnet18_32x32 OpenOOD's `ResNet18_32x32` loads it as is."""
    model, _ = load_network(path, net)
    buffer = io.BytesIO()
    torch.save(export_state_dict(model), buffer)
    atomic_write(out, lambda f: f.write(buffer.getbuffer()))
    return out
