"""The optimizer of a task and its per-epoch learning-rate schedule (re-created at every task, as in the paper)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def lr_factor(cfg_train: TrainConfig, epoch: int) -> float:
    """Per-epoch learning-rate multiplier (the paper's cosine: cos(99 pi e / (200 (K - 1))))."""
    if cfg_train.schedule == "cosine":
        k = cfg_train.epochs
        return 1.0 if k <= 1 else math.cos(99 * math.pi * epoch / (200 * (k - 1)))
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
