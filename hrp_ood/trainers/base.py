"""What every method's trainer shares (OpenOOD's trainers have the same shape): the co-trained `Member`s, the
batch a step sees (`StepInputs`), the run-wide `StepContext`, the epoch's plan of batches (`EpochPlan`) and the
update that refuses non-finite losses.

A method is one module of this package, named by its row of `hrp_ood.registry.METHODS`. The module defines

* `step(ctx, members, batch) -> dict[str, Tensor]`: one optimisation step; returns detached scalars to log
  (never `.item()` here: a GPU step must not wait on the host);
* optionally `epoch_plan(ctx, members, data, epoch) -> EpochPlan`: its pass over the training set before the
  epoch's steps (DivideMix's evaluation pass and GMM, UNICON's JSD, ProMix's selection) and the batches the
  epoch's steps take; without it, one shuffle of the training set in full batches (`shuffled_plan`);
* optionally `projection_head(cfg, net) -> nn.Module | None`: a second trained module per network;
* optionally `reference_values(cfg) -> dict[str, Any]`: the reference code's hyper-parameters for the keys the
  user left unset (None), by dataset and noise level; the resolved config records them.

Data-parallel (torchrun): each rank runs the same step on its slice of the global batch; `Member.forward`
and `Member.head_forward` are the DDP-wrapped modules, `Member.net` the plain one the meta step
differentiates. The losses follow the gradient convention of `hrp_ood.distributed` (each rank's loss is
W × its share, DDP averages), so the update equals one process on the whole batch; the logged terms
are rank-local (the trainer averages them over ranks), the non-finite check is global.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hrp_ood.config import TrainConfig
from hrp_ood.data.augment import BatchAugment
from hrp_ood.distributed import broadcast_from_main, global_sum, rank, world_size
from hrp_ood.method import ReliabilityMemory
from hrp_ood.trainers.signals import EpochSignals


@dataclass
class Member:
    """One co-trained network: backbone, optional CDCL projection head, optimiser, lr schedule."""

    net: nn.Module
    head: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # the training passes; `torch.compile(net)` with --set compile=true. The meta step differentiates
    # `net` itself (functional_call + forward-mode AD), which compiled graphs do not support.
    forward: Callable[..., Any] | None = None
    # the projection head's training pass (DDP-wrapped in a data-parallel run)
    head_forward: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.net
        if self.head_forward is None:
            self.head_forward = self.head

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


@dataclass
class StepInputs:
    images: torch.Tensor  # uint8 (n, 3, H, W) on the device
    noisy_labels: torch.Tensor
    index: torch.Tensor  # positions in the training set (per-sample reliability memory and logging)
    epoch: float  # fractional epoch, drives warm-up / ramp schedules
    clean_labels: torch.Tensor | None = None  # for the logged diagnostics only: no training computation reads them
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the plan's per-step tensors (EpochPlan)


@dataclass
class StepContext:
    cfg: TrainConfig
    augment: BatchAugment
    meta_images: torch.Tensor
    meta_labels: torch.Tensor
    autocast_device: str | None  # "cuda" when AMP is on, else None
    forget_rate: float = 0.0
    skipped_steps: int = 0  # non-finite steps skipped under on_nonfinite="skip"
    signals: EpochSignals | None = (
        None  # this epoch's per-sample diagnostics (hrp_ood/trainers/signals.py), if recorded
    )
    # one per network: the per-sample averages of its meta-gradients (reliability_momentum > 0)
    memories: list[ReliabilityMemory] = field(default_factory=list)
    # the whole training set (uint8 images), for methods whose step reads rows beyond its batch (the unlabeled rows)
    train_images: torch.Tensor | None = None
    # a method's state across epochs (tensors; saved in last.pt): DivideMix's loss history, ProMix's class prior
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def autocast(self):
        if self.autocast_device is None:
            return nullcontext()
        return torch.autocast(self.autocast_device, dtype=torch.bfloat16)

    def sample_meta_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random meta batch (without replacement); data-parallel: rank 0 draws it, each rank takes an
        equal slice, so the ranks' mean meta gradient is the one of the whole meta batch."""
        ranks = world_size()
        count = min(self.cfg.meta_batch_size, len(self.meta_labels)) // ranks * ranks
        pick = torch.randperm(len(self.meta_labels), device=self.meta_labels.device)[:count]
        pick = broadcast_from_main(pick).chunk(ranks)[rank()]
        return self.augment.weak(self.meta_images[pick]), self.meta_labels[pick]


class NonFiniteLoss(Exception):
    """Raised before any weight changes, naming the loss terms that are not finite."""

    def __init__(self, terms: list[str]):
        super().__init__(", ".join(terms))
        self.terms = terms


def loss_precision(t: torch.Tensor) -> torch.Tensor:
    """Autocast's half-precision outputs are promoted to float32 for the losses; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def update(ctx: StepContext, members: list[Member], loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
    """Backward and step every member's optimiser, unless the loss is not finite (then raise or skip)."""
    for m in members:
        m.optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(global_sum(loss.detach())):  # every rank takes the same branch
        if ctx.cfg.on_nonfinite == "skip":
            ctx.skipped_steps += 1
            return
        raise NonFiniteLoss([k for k, v in terms.items() if k.startswith("loss") and not torch.isfinite(v).all()])
    loss.backward()
    for m in members:
        m.optimizer.step()


def record_loss(ctx: StepContext, batch: StepInputs, per_sample: list[torch.Tensor]) -> None:
    """The small-loss signal (CE on the noisy label, mean over the networks) for the epoch's diagnostics."""
    if ctx.signals is not None:
        ctx.signals.record("loss", batch.index, torch.stack(per_sample).detach().mean(dim=0))


@dataclass
class EpochPlan:
    """The batches of one epoch: `index[i]` are the training-set positions of step i's batch; `extras` hold
    further per-step tensors a method's step reads (first dimension = steps, e.g. DivideMix's unlabeled rows and
    the network it trains), `state` per-epoch tensors (e.g. the clean probability of every sample). The plan is
    saved in a mid-epoch checkpoint, so a resumed epoch takes the same batches."""

    index: torch.Tensor  # (steps, batch) int64
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.index)

    def step_extras(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.extras.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index.cpu(), "extras": _cpu(self.extras), "state": _cpu(self.state)}

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any], device: torch.device) -> EpochPlan:
        def to(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {key: value.to(device) for key, value in tensors.items()}

        return cls(saved["index"], to(saved.get("extras", {})), to(saved.get("state", {})))


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.cpu() for key, value in tensors.items()}


def shuffled_plan(num_samples: int, batch_size: int) -> EpochPlan:
    """One random order of the training set in full batches (the last partial batch is dropped: BN and the
    batch-level normalisations want full batches). Drawn on the CPU generator: the same order on every device."""
    steps = num_samples // batch_size
    return EpochPlan(torch.randperm(num_samples)[: steps * batch_size].view(steps, batch_size))


def cycled_batches(order: torch.Tensor, steps: int, batch_size: int) -> torch.Tensor:
    """(steps, batch_size) rows taken from `order` in turn, starting again from its beginning when it runs out
    (the reference codes' `next(iterator)` over a smaller loader)."""
    if len(order) == 0:
        raise ValueError("cycled_batches needs at least one row")
    repeats = -(-steps * batch_size // len(order))
    return order.repeat(repeats)[: steps * batch_size].view(steps, batch_size)
