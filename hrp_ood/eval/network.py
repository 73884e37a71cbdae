"""From an `hrp-ood train` checkpoint to an OpenOOD-style network (net 1, net 2 or their ensemble)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hrp_ood.checkpoint import load_checkpoint, read_checkpoint
from hrp_ood.config import TrainConfig, saved_config
from hrp_ood.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from hrp_ood.errors import UserError
from hrp_ood.io import atomic_write, atomic_write_text
from hrp_ood.models import EnsembleNet, create_model, export_state_dict

NET_CHOICES = ("1", "2", "ensemble")


REQUIRED_KEYS = ("config", "dataset", "nets", "epoch")


def checkpoint_config(state: dict[str, Any], path: Path) -> TrainConfig:
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise UserError(
            f"{path} lacks {', '.join(missing)}: it is not a complete checkpoint of `hrp-ood train`; "
            "use the run's last.pt or best.pt"
        )
    try:
        return saved_config(state["config"], path)
    except (KeyError, TypeError) as err:
        raise UserError(f"{path}: the checkpoint's config does not match this version of hrp-ood ({err})") from None


def weights_mismatch(
    expected: dict[str, torch.Tensor], weights: dict[str, Any], num_classes: int, head: str = "fc"
) -> str | None:
    """Why `weights` cannot be loaded into a network whose state dict is `expected`, or None if it can.

    Different tensor names mean another backbone; the same names with a classifier `head` (our backbones' `fc`)
    of another height mean another class count; other shape differences mean another width of the same backbone.
    """
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        examples = ", ".join([*(f"no {k}" for k in missing[:2]), *(f"extra {k}" for k in unexpected[:2])])
        return (
            f"they are from another backbone ({len(missing)} tensor(s) missing, {len(unexpected)} unknown: {examples})"
        )
    shapes = {k: (tuple(getattr(weights[k], "shape", ())), tuple(expected[k].shape)) for k in expected}
    shapes = {k: (got, want) for k, (got, want) in shapes.items() if got != want}
    if not shapes:
        return None
    weight = f"{head}.weight"
    if weight in shapes and shapes[weight][0][:1] != (num_classes,):
        return f"they are from another class count (the classifier {head} has {shapes[weight][0][0]} outputs)"
    key, (got, want) = next(iter(shapes.items()))
    return f"they are from another width of the backbone ({key} has shape {got}, expected {want})"


def weights_value_problem(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> str | None:
    """Why weights of the right names and shapes (`weights_mismatch` is None) still cannot be evaluated, or None:
    a sparse or meta tensor (load_state_dict cannot copy it), values that are not real floating point where the
    network's are (integer, complex), NaN or inf values, a negative BatchNorm running variance."""
    for name, want in expected.items():
        got = weights[name]
        if got.layout != torch.strided:
            return f"{name} is a sparse tensor ({got.layout}); save dense weights (tensor.to_dense())"
        if got.is_meta:
            return f"{name} is a meta tensor, which holds no values; save the weights of a trained network"
        if want.is_floating_point() and not got.is_floating_point():
            return f"{name} holds {got.dtype} values where the network has real floating point ones ({want.dtype})"
        if got.is_floating_point():
            bad = int((~torch.isfinite(got)).sum())
            if bad:
                return f"{name} holds {bad} NaN/inf value(s) of {got.numel()} (a diverged training, or an edited file)"
            negative = int((got < 0).sum()) if name.endswith("running_var") else 0
            if negative:
                return f"{name} (BatchNorm statistics) holds {negative} negative variance(s): they give NaN outputs"
    return None


def networks_from_checkpoint(state: dict[str, Any], path: Path) -> list[nn.Module]:
    """Rebuild every saved network from the checkpoint's own config and load its weights (strictly)."""
    cfg = checkpoint_config(state, path)
    num_classes = len(state["dataset"]["classes"])
    nets = []
    for k, weights in enumerate(state["nets"]):
        net = create_model(cfg.model, num_classes=num_classes)
        expected = net.state_dict()
        problem = (
            weights_mismatch(expected, weights, num_classes) or weights_value_problem(expected, weights)
            if isinstance(weights, dict)
            else f"they are a {type(weights).__name__}, not a state dict"
        )
        if problem:
            raise UserError(
                f"{path}: net {k + 1}'s weights do not fit the checkpoint's {cfg.model} for "
                f"{num_classes} classes ({cfg.dataset}): {problem}; use a checkpoint written by "
                "`hrp-ood train` and not edited since"
            )
        net.load_state_dict(weights)
        nets.append(net.eval())
    return nets


def select_network(nets: list[nn.Module], which: str, path: Path, test_rule: str = "mean") -> nn.Module:
    """Net 1, net 2, or the ensemble under the method's test rule (the mean or the sum of the logits)."""
    if which not in NET_CHOICES:
        raise UserError(f"--net must be one of {', '.join(NET_CHOICES)}, got {which!r}")
    if which == "ensemble":
        return EnsembleNet(nets, combine=test_rule) if len(nets) > 1 else nets[0]
    k = int(which)
    if k > len(nets):
        raise UserError(f"{path} holds {len(nets)} network(s) (single-network method); use --net 1")
    return nets[k - 1]


def network_from_state(
    state: dict[str, Any], path: Path, which: str = "ensemble", device: str | torch.device = "cpu"
) -> nn.Module:
    """The network `which` of a loaded checkpoint (read from `path`), in eval mode on `device`."""
    test_rule = checkpoint_config(state, path).spec.test_rule
    net = select_network(networks_from_checkpoint(state, path), which, path, test_rule)
    return net.to(device).eval()


def load_network(
    path: str | Path, which: str = "ensemble", device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """(network in eval mode on `device`, checkpoint state): a trained run's checkpoint as a network to call from
    Python (`hrp-ood evaluate` goes through `hrp_ood.eval.session`)."""
    path = Path(path)
    state = load_checkpoint(path)
    return network_from_state(state, path, which, device), state


# The normalisation OpenOOD's preprocessors apply for a 32x32 benchmark (openood/preprocessors/transform.py):
# CIFAR-100's for cifar100, CIFAR-10's for every other ID set of this size.
OPENOOD_NORMALIZATION = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
NORMALIZATION_TOLERANCE = 5e-4  # OpenOOD's constants have four decimals


@dataclass
class Export:
    """What `export_checkpoint` wrote: the state dict, its normalisation file, and how that compares to OpenOOD's."""

    weights: Path
    normalization: Path
    mean: tuple[float, ...]
    std: tuple[float, ...]
    openood_benchmark: str
    matches_openood: bool


def normalization_path(out: Path) -> Path:
    """Where the normalisation of an exported state dict is written: `<out>.normalization.json`."""
    return out.with_name(out.name + ".normalization.json")


def export_checkpoint(path: Path, out: Path, net: str = "1") -> Export:
    """A plain state dict of one network (for resnet18_32x32 OpenOOD's `ResNet18_32x32` loads it as is), and beside
    it the normalisation the network was trained with: OpenOOD must feed it images normalised the same way."""
    path = Path(path)
    state, sha256 = read_checkpoint(path)
    model = network_from_state(state, path, net)
    saved = state["dataset"]
    mean, std = tuple(saved["mean"]), tuple(saved["std"])
    benchmark = "cifar100" if saved["name"] == "cifar100" else "cifar10"
    openood_mean, openood_std = OPENOOD_NORMALIZATION[benchmark]
    matches = all(abs(a - b) <= NORMALIZATION_TOLERANCE for a, b in zip((*mean, *std), (*openood_mean, *openood_std)))
    buffer = io.BytesIO()
    torch.save(export_state_dict(model), buffer)
    atomic_write(out, lambda f: f.write(buffer.getbuffer()))
    info = {
        "checkpoint": str(path),
        "checkpoint_sha256": sha256,
        "net": net,
        "model": state["config"]["model"],
        "dataset": saved["name"],
        "classes": saved["classes"],
        "image_size": saved["image_size"],
        "input": "x = (pixel / 255 - mean) / std, per RGB channel",
        "mean": list(mean),
        "std": list(std),
        "openood_benchmark": benchmark,
        "openood_mean": list(openood_mean),
        "openood_std": list(openood_std),
        "matches_openood": matches,
    }
    atomic_write_text(normalization_path(out), json.dumps(info, indent=2) + "\n")
    return Export(out, normalization_path(out), mean, std, benchmark, matches)
