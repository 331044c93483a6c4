"""torch.distributed helpers that are no-ops in a single process.

Global means over workers come in two kinds: of a statistic inside the loss (:func:`global_mean`, differentiable:
its backward sums the gradients over workers too) and of a loss term whose count differs per worker
(:func:`mean_over_workers`: this worker's share, so DDP's gradient average gives the one-process mean).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across workers (returns ``t`` for chaining)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world_size()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all workers along dim 0 (no gradient)."""
    if not is_dist():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _AllReduceSum(torch.autograd.Function):
    """Sum over workers whose backward is again a sum over workers, so that the data-parallel average of the
    workers' gradients equals the one-process gradient of a loss that uses a global statistic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


def all_reduce_sum_grad(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over workers (identity in one process); the only differentiable all-reduce."""
    if not is_dist():
        return t
    return _AllReduceSum.apply(t)


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a 1-D tensor over every worker's entries (differentiable; a plain mean in one process)."""
    count = values.new_tensor(float(values.numel())).detach()
    stats = all_reduce_sum_grad(torch.stack([values.sum(), count]))
    return stats[0] / stats[1]


def global_count(count: float, device=None) -> float:
    """A per-worker count summed over workers."""
    return float(all_reduce_sum(torch.tensor([float(count)], device=device)).item())


def mean_over_workers(total: torch.Tensor, count: float) -> tuple[torch.Tensor, float]:
    """This worker's sum ``total`` of a loss over ``count`` entries -> (its share of the global mean, global count).

    Returns total · W / Σ_w count_w: DDP averages the W workers' gradients, so the result's gradient is the
    one-process gradient of the mean over every worker's entries. A global count of 0 gives ``total`` · W (0)."""
    n = global_count(count, total.device)
    return total * world_size() / max(n, 1.0), n
