"""Data-parallel training across processes (torchrun): process group, rank queries and the global reductions.

Every helper is the identity in a single process (no process group, or a group of one), so the maths
code calls them unconditionally and one-process numbers do not change by a bit.

The gradient convention (used by every loss of `hrp_ood.method`): DDP averages gradients over the W
ranks, ∇ = (1/W) Σ_r ∇L_r. Each rank's loss L_r is therefore W × its share of the global loss
(Σ_r L_r = W·L), e.g. a per-sample mean divides the local sum by the per-rank mean count N/W
(`per_rank_count`), and then DDP's mean is exactly the one-process gradient ∇L. Reductions that
carry gradients (`global_sum`, `all_gather_with_grad`) route them as the adjoint of the sum they
compute: the backward pass all-reduces the incoming gradients, so a rank's input receives what every
rank's loss owes it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
from torch import nn

from hrp_ood.errors import UserError

log = logging.getLogger(__name__)

Result = TypeVar("Result")


# ---- process group --------------------------------------------------------------------------------------
def init_from_env(device_type: str | None = None) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    nccl when this rank trains on CUDA, gloo otherwise. A no-op (returns False) in a single process
    or when the group exists already; returns True when it created the group (the caller destroys it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return False
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    log.debug("rank %d of %d joined the process group (%s)", rank(), world_size(), dist.get_backend())
    return True


def launch(nproc: int, function: Callable[..., Any], *args: Any) -> None:
    """`function(*args)` in `nproc` new processes that join one process group, as `torchrun --standalone` starts
    them (RANK, LOCAL_RANK, WORLD_SIZE and a rendezvous on this machine); a failing process is a UserError."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # its multi-line report of a failed child; ours is one line below
    try:
        elastic_launch(config, function)(*args)
    except ChildFailedError as err:
        failed_rank, failure = min(err.failures.items())
        raise UserError(
            f"process {failed_rank} of {nproc} failed (exit code {failure.exitcode}): {_child_error(failure.message)}"
        ) from None
    finally:
        elastic_log.setLevel(level)


def _child_error(message: Any) -> str:
    """The last line of a failed child's error: elastic's error file gives {"message": "Type: text", ...}; a
    UserError's text is the message the user needs, any other exception keeps its type."""
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = str(message or "").strip().splitlines() or ["no message; see the log"]
    return lines[-1].removeprefix("UserError: ")


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and progress bars."""
    return rank() == 0


def rank_seed(seed: int, rank_index: int) -> int:
    """The seed of one rank's generators: the run's seed on rank 0 (one-process runs are unchanged), an
    independent stream derived from (seed, rank) elsewhere, so augmentation and mixup draws differ per rank."""
    if rank_index == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank_index]).generate_state(1)[0])


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def on_main(fn: Callable[[], Result]) -> Result:
    """Run ``fn`` on rank 0 only and give its (picklable) result to every rank.

    An error on rank 0 is raised on every rank (a UserError with the same message), so no rank waits forever.
    """
    if world_size() == 1:
        return fn()
    message: list[Any] = [None, None]  # [result, error text]
    failure: BaseException | None = None
    if is_main():
        try:
            message[0] = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks were told
            failure, message[1] = err, str(err) if isinstance(err, UserError) else f"rank 0 failed: {err!r}"
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[1] is not None:
        raise UserError(message[1])
    return message[0]


def main_first(fn: Callable[[], Result]) -> Result:
    """Run ``fn`` on rank 0, then on the other ranks (rank 0 creates files the others read); errors as `on_main`."""
    if world_size() == 1:
        return fn()
    made: list[Result] = []
    on_main(lambda: made.append(fn()))
    return made[0] if is_main() else fn()


def broadcast_from_main(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (same shape and dtype everywhere)."""
    if world_size() == 1:
        return t
    t = t.clone()
    dist.broadcast(t, src=0)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, …] on every rank."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ---- reductions ----------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """S = Σ_r t_r on every rank. Backward: ∂(Σ_r L_r)/∂t_r = Σ_r ∂L_r/∂S (an all-reduce again, so it is
    itself differentiable for double backward); forward-mode tangent: dS = Σ_r dt_r."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        out = tangent.clone()
        dist.all_reduce(out)
        return out


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of ``t`` (same shape everywhere); differentiable in reverse and forward mode."""
    if world_size() == 1:
        return t
    return _AllReduceSum.apply(t)


def _all_reduce_detached(t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def global_min(t: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum over ranks (not differentiable: callers reduce detached statistics, Eq. 10)."""
    return t if world_size() == 1 else _all_reduce_detached(t, dist.ReduceOp.MIN)


def global_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks (not differentiable: callers reduce detached statistics, Eq. 10)."""
    return t if world_size() == 1 else _all_reduce_detached(t, dist.ReduceOp.MAX)


def global_count(n: int) -> int:
    """Σ over ranks of a local count (a Python int, e.g. the local batch size)."""
    if world_size() == 1:
        return n
    return int(
        _all_reduce_detached(torch.tensor(n, dtype=torch.int64, device=_collective_device()), dist.ReduceOp.SUM).item()
    )


def per_rank_count(count: torch.Tensor) -> torch.Tensor:
    """The normaliser of a rank's loss: max(global count, 1) / W (see the module docstring).

    A mean over a set spread across ranks, (1/|S|) Σ_{i∈S} ℓ_i, becomes on rank r
    Σ_{i∈S_r} ℓ_i / (|S|/W) = W × its share; DDP's gradient mean turns that back into ∇ of the
    global mean. In one process: max(|S|, 1).
    """
    return global_sum(count).clamp_min(1) / world_size()


def global_mean_of_grads(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(1/W) Σ_r g_r for every tensor of ``grads`` (one flattened all-reduce): with equal local batch
    sizes, the gradient of the global mean loss. The meta gradient v = ∇L_meta of SPEC Eq. 3."""
    if world_size() == 1:
        return grads
    flat = torch.cat([g.detach().reshape(-1) for g in grads.values()])
    flat = _all_reduce_detached(flat, dist.ReduceOp.SUM) / world_size()
    out, offset = {}, 0
    for name, g in grads.items():
        out[name] = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """cat_r t_r on every rank; backward sums the gradients all ranks computed for each slice and gives each
    rank its own slice's total (SimCLR/solo-learn's GatherLayer)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Rows of every rank stacked in rank order, (W·n, …); the local slice carries its gradient, and it
    receives the gradient of every rank's loss (equal n on every rank)."""
    if world_size() == 1:
        return t
    return _AllGatherWithGrad.apply(t)


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Rows of every rank stacked in rank order (no gradient: labels, weights, flags)."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def _collective_device() -> torch.device:
    """Where small control tensors live for the backend: CUDA for nccl, CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- synchronised batch normalisation ------------------------------------------------------------------
def _primal(t: torch.Tensor) -> torch.Tensor:
    """The value of a (possibly forward-AD dual) tensor, without tangent or graph."""
    return fwAD.unpack_dual(t).primal.detach()


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training-mode statistics are over the whole global batch (every rank's rows).

    mean_c = Σ_r Σ x / N,   var_c = Σ_r Σ (x − mean_c)² / N   (N = global count of values per channel);
    y = (x − mean_c)/√(var_c + eps)·w + b; running statistics as nn.BatchNorm2d (unbiased variance).

    torch.nn.SyncBatchNorm does the same with fused kernels but supports only GPU inputs and has no
    forward-mode AD rule, and the exact meta step (SPEC §3.1) differentiates the train-mode forward in
    forward mode; these statistics use `global_sum`, which has one. Same state-dict keys as
    nn.BatchNorm2d, so checkpoints load either way. In one process (or in eval mode) it is nn.BatchNorm2d.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        out_dtype = x.dtype
        if x.dtype in (torch.float16, torch.bfloat16):  # statistics in float32, like the fused kernels
            x = x.float()
        reduce_dims = [0, *range(2, x.dim())]
        shape = [1, -1, *([1] * (x.dim() - 2))]
        count = global_sum(torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device))
        mean = global_sum(x.sum(reduce_dims)) / count
        centred = x - mean.view(shape)
        var = global_sum((centred * centred).sum(reduce_dims)) / count
        if self.track_running_stats:
            self._update_running_stats(_primal(mean), _primal(var), _primal(count))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(out_dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_to_global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d of ``module`` (in place) by a GlobalBatchNorm with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            replacement = GlobalBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
                device=_device_of(child),
                dtype=_dtype_of(child),
            )
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            if child.affine:
                replacement.weight.requires_grad_(child.weight.requires_grad)
                replacement.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, replacement)
        else:
            convert_to_global_batch_norm(child)
    return module


def _device_of(module: nn.Module) -> torch.device | None:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else None


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    tensor = next(iter(module.parameters()), None)
    return tensor.dtype if tensor is not None else None
