"""Collectives over ``torch.distributed``; the identity in a single process (no Ray import here)."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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


def _comm_device(tensors: list[torch.Tensor]) -> torch.device:
    """Where a collective's buffers must live: the current CUDA device under NCCL, else the tensors' own."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensors[0].device if tensors else torch.device("cpu")


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's values of ``tensors`` on every rank (new tensors, on each input's device and dtype); the
    input list itself without a process group.

    Shapes may differ between ranks (a memory basis whose size a rank computed differently): rank 0's shapes
    are broadcast first, then the values, one collective per dtype. Every rank must pass the same number of
    tensors with the same dtypes, in the same order.
    """
    if not is_distributed() or not tensors:
        return tensors
    dev = _comm_device(tensors)
    shapes = torch.tensor([len(t.shape) for t in tensors] + [n for t in tensors for n in t.shape],
                          dtype=torch.int64)
    length = torch.tensor([shapes.numel()], dtype=torch.int64, device=dev)
    dist.broadcast(length, src=0)
    shapes_buf = torch.zeros(int(length.item()), dtype=torch.int64, device=dev)
    if rank() == 0:
        shapes_buf.copy_(shapes)
    dist.broadcast(shapes_buf, src=0)
    flat_shapes = shapes_buf.cpu().tolist()
    ndims, pos, rank0_shapes = flat_shapes[:len(tensors)], len(tensors), []
    for nd in ndims:
        rank0_shapes.append(tuple(flat_shapes[pos:pos + nd]))
        pos += nd
    out: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, members in by_dtype.items():
        sizes = [int(torch.Size(rank0_shapes[i]).numel()) for i in members]
        if rank() == 0:
            flat = torch.cat([tensors[i].reshape(-1).to(dev) for i in members])
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=dev)
        dist.broadcast(flat, src=0)
        offset = 0
        for i, n in zip(members, sizes):
            out[i] = flat[offset:offset + n].view(rank0_shapes[i]).to(tensors[i].device).clone()
            offset += n
    return out


def agree_with_rank0(names: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make results that every rank computed itself equal everywhere: rank 0's values are returned on every
    rank (:func:`broadcast_from_rank0`), and a rank whose own result differed logs a warning naming each
    differing entry (``names[i]`` for ``tensors[i]``) and by how much, so that nodes whose linear algebra
    disagrees are seen, not silently averaged over. The identity without a process group."""
    agreed = broadcast_from_rank0(tensors)
    if agreed is tensors:
        return tensors
    for name, own, got in zip(names, tensors, agreed):
        if own.shape != got.shape:
            log.warning("rank %d computed %s with shape %s, rank 0 with %s; rank 0's is used",
                        rank(), name, tuple(own.shape), tuple(got.shape))
        elif not torch.equal(own, got):
            diff = (own.double() - got.double()).abs().max().item()
            log.warning("rank %d computed %s differently from rank 0 (max abs difference %.3g); rank 0's is "
                        "used", rank(), name, diff)
    return agreed
