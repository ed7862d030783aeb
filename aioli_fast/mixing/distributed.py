"""Data-parallel agreement: per-domain statistics are summed over ranks before any mixer uses them."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks in the default process group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over all ranks (one collective; ``x`` itself when running alone). Returns a new tensor."""
    out = x.clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
