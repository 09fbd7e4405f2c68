"""The optimizer of a task and its per-epoch learning-rate schedule (re-created at every task, as in the paper)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def _cosine(epoch: int, epochs: int) -> float:
    """The paper's factor ``cos(99 pi e / (200 (K - 1)))`` for epoch ``e`` of ``K`` (1 when ``K`` is 1)."""
    return 1.0 if epochs <= 1 else math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))


def lr_factor(cfg_train: TrainConfig, epoch: int) -> float:
    """Per-epoch learning-rate multiplier of epoch ``epoch`` (0-based) of ``train.epochs``.

    ``cosine`` applies the paper's factor ``f(e)`` in epoch ``e``: ``f(0), f(1), ..., f(K - 1)``, ending near
    1.6% of the rate. ``cosine-repeat-first`` applies ``f(0), f(0), f(1), ..., f(K - 2)``: the reference code's
    scheduler sets ``f(0)`` when it is built, then rewinds its epoch counter, so its first step after epoch 0
    sets ``f(0)`` again and every later epoch runs one factor behind (it integrates 32% more learning rate
    over 5 epochs, 7.7% over 20). ``step`` multiplies by ``train.step_gamma`` at each milestone; ``constant``
    is 1."""
    if cfg_train.schedule == "cosine":
        return _cosine(epoch, cfg_train.epochs)
    if cfg_train.schedule == "cosine-repeat-first":
        return _cosine(max(epoch - 1, 0), cfg_train.epochs)
    if cfg_train.schedule == "step":
        return cfg_train.step_gamma ** sum(1 for m in cfg_train.step_milestones if epoch >= m)
    return 1.0


def make_optimizer(cfg_train: TrainConfig, adapter_params: list[nn.Parameter],
                   head: nn.Linear | list[nn.Linear]) -> torch.optim.Optimizer:
    """Adam or SGD over the adapter parameters (``train.lr``) and the task's head, or the trained heads in
    order (``train.head_lr``, default ``train.lr``); each group keeps its ``base_lr`` for :func:`lr_factor`."""
    t = cfg_train
    groups = []
    if adapter_params:
        groups.append({"params": adapter_params, "lr": t.lr, "base_lr": t.lr, "name": "adapters"})
    head_lr = t.head_lr if t.head_lr is not None else t.lr
    heads = head if isinstance(head, list) else [head]
    groups.append({"params": [p for h in heads for p in h.parameters()], "lr": head_lr, "base_lr": head_lr, "name": "head"})
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, betas=tuple(t.betas), weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, momentum=t.momentum, weight_decay=t.weight_decay)
