"""One optimisation step of one rank on its part of a global batch, and the static batch size of a compiled
step (``train.compile``)."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import collective
from ..data.loader import block_bounds, epoch_permutation


def largest_rank_share(task_sizes: Sequence[int], batch_size: int, seed: int, epochs: int,
                       world_size: int) -> int:
    """The most samples one rank owns in any step of a run whose tasks train on ``task_sizes`` samples each:
    the static batch size of a compiled training step (:class:`~.learner.ContinualLearner` pads every step's
    share to it, so that one graph serves the whole run).

    One rank owns every global batch whole: the batch size, or the largest task if that is smaller. With
    several ranks a rank owns the part of each global batch that falls in its block
    (:func:`~inflora_ray.data.loader.train_batches`); the parts vary from step to step, and their maximum over
    every epoch of every task is found here from the same permutations, without building the batches.
    """
    largest = 0
    for task, n in enumerate(task_sizes):
        if world_size == 1 or n == 0:
            largest = max(largest, min(batch_size, n))
            continue
        ends = np.array([block_bounds(n, r, world_size)[1] for r in range(world_size)])
        step_of_position = np.arange(n) // batch_size  # global batch b holds permutation positions [bB, (b+1)B)
        for epoch in range(epochs):
            owner = np.searchsorted(ends, epoch_permutation(np.arange(n), seed, task, epoch), side="right")
            largest = max(largest, int(np.bincount(step_of_position * world_size + owner).max()))
    return largest


def train_step(module: nn.Module, images: torch.Tensor, targets: torch.Tensor, global_size: int,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               autocast: Callable[[], contextlib.AbstractContextManager],
               grad_clip: Optional[float] = None) -> torch.Tensor:
    """Forward, backward, gradient all-reduce and update on this rank's ``images`` of a global batch of
    ``global_size`` samples; returns the summed (not averaged) cross-entropy of this rank's samples, detached.
    ``module`` returns logits, or ``(logits, aux)`` where ``aux`` is a method's auxiliary loss summed over
    this rank's samples (or None): it is added to the cross-entropy sum before the division by
    ``global_size``, so the gradients stay exact under data parallelism, and is included in the returned sum.

    The loss is the sum over this rank's samples divided by the global batch size, and gradients are summed
    over ranks, so every rank applies exactly the global batch's mean gradient. A rank that owns no sample
    of this global batch (the batch is cut by a random permutation and each rank owns one block of the data,
    so a rank's part can be empty in any step) does not run the model (some attention kernels reject a batch
    of 0): it contributes zero gradients to the same all-reduce, so every rank takes part in every collective
    and all ranks make the same update. With fp16 the scaler scales the loss, then unscales the reduced
    gradients, skips the update when one of them is not finite (every rank sees the same reduced gradients,
    so all skip alike) and adapts its scale; for fp32 and bf16 it is disabled and passes everything through.
    ``grad_clip``: the reduced (global-batch) gradients of all trained tensors are rescaled together so that
    their global L2 norm is at most this value (after unscaling), the same on every rank.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    if targets.numel():
        with autocast():
            out = module(images)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        batch_loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if aux is not None:
            batch_loss = batch_loss + aux.float()
        scaler.scale(batch_loss * (1.0 / global_size)).backward()
    else:
        batch_loss = torch.zeros((), device=targets.device)
    if collective.all_reduce_gradients(params):
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
        scaler.step(optimizer)
        scaler.update()
    return batch_loss.detach()
