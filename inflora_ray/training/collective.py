"""Collectives over ``torch.distributed``; the identity in a single process (no Ray import here)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over all ranks, in place; returns the same list.

    Tensors are flattened into one buffer per dtype so the reduction is one collective per dtype.
    """
    if not is_distributed() or not tensors:
        return tensors
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    return tensors


def all_reduce_gradients(params: list[torch.Tensor]) -> bool:
    """Sum the gradients of ``params`` over all ranks, in place (one collective per dtype). Returns whether
    there is a gradient to apply.

    A parameter without a gradient on this rank (a rank that had no sample in the step) contributes zeros,
    so every rank reduces the same tensors in the same order and no rank is left waiting in the collective.
    Without a process group nothing is reduced.
    """
    if not is_distributed():
        return any(p.grad is not None for p in params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum([p.grad for p in params])
    return True
