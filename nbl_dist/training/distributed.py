"""Data parallelism over a training run's workers, through torch.distributed when a process group is up (Ray
Train's workers) and as the identity when not (one process: tests, debugging). Every worker holds the same trained
parameters and optimizer state and applies the same update, so W workers equal one at the same global batch, up to
float round-off. No Ray.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def world() -> tuple[int, int]:
    """(this worker's rank, number of workers): (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Floats summed over the workers (float64; the values themselves without a process group)."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def step_share(order: torch.Tensor, step: int, batch_size: int, rank: int, workers: int) -> torch.Tensor:
    """Indices of the training items (blocks, sequences) this worker takes at `step`: its contiguous share of the
    global batch of `batch_size` items, taken in `order` (a permutation fixed by the seed, the same on every worker
    and after a restart)."""
    batch = order[step * batch_size:(step + 1) * batch_size]
    share = batch_size // workers
    return batch[rank * share:(rank + 1) * share]


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Every worker's gradients of `params` summed, in one all-reduce over a flat buffer (the trained parameters
    are small: a few d x d maps, one draft layer)."""
    if world()[1] == 1:
        return
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(summed)
