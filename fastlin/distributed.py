"""Data parallelism over torch.distributed for fastlin's training loops.

When a default process group is initialised, FusedLinearRegressor treats each rank's data as one
shard of a dataset: every rank computes fused local statistics (Gram blocks, or loss and gradient
sums), they are summed with ``all_reduce``, and every rank applies the same update, so the model
equals a single process trained on the concatenated shards. gloo on the CPU, NCCL on GPUs; no
transport of fastlin's own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_active() -> bool:
    """Whether a default process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sums each tensor over the ranks, in place (no-op on a single process)."""
    if not is_active():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def check_same(op: str, what: str, value: int, device: torch.device | str = "cpu") -> None:
    """Raises the same ValueError on every rank when ``value`` differs between ranks (one small
    all_gather; every rank takes part, so none is left waiting)."""
    if not is_active():
        return
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([int(value)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    values = [int(v.item()) for v in every]
    if len(set(values)) != 1:
        raise ValueError(
            f"fastlin.{op}: every rank must have the same {what}; got {values} on ranks 0..{len(values) - 1}"
        )
