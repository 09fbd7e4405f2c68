"""What the loop keeps: a finished task's result, and the progress of the task being trained (saved in
mid-task checkpoints so a resumed run continues exactly where it stopped)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from ..core.metrics import average_incremental_accuracy, task_mean_accuracy


@dataclass
class TaskResult:
    """What one task produced; every worker holds the same (reduced) figures."""
    task: int
    classes: list[int]
    correct: list[int]
    total: list[int]
    own_head_correct: list[int]
    accuracy: list[float]
    own_head_accuracy: list[float]
    pooled_accuracy: float  # after this task, over the test images of all seen tasks together
    task_mean_accuracy: float  # after this task, the mean of the seen tasks' accuracies
    average_incremental_accuracy: float  # the mean of pooled_accuracy over tasks 0..task
    average_incremental_accuracy_task_mean: float  # the mean of task_mean_accuracy over tasks 0..task
    forgetting: float
    backward_transfer: float
    train_loss: float
    task_seconds: float
    train_seconds: float
    train_images: int
    images_per_second: float
    peak_memory_mb: float
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def with_task_mean(results: list[dict]) -> list[dict]:
    """``results`` (the :meth:`TaskResult.to_dict` of tasks 0, 1, ... in order) with ``task_mean_accuracy`` and
    ``average_incremental_accuracy_task_mean`` computed from each one's per-task ``accuracy`` where missing:
    results saved (checkpoints, result files) before those fields existed. New dicts; ``results`` is left as
    it is."""
    after = task_mean_accuracy([r["accuracy"] for r in results])
    return [{"task_mean_accuracy": after[t], "average_incremental_accuracy_task_mean":
             average_incremental_accuracy(after[:t + 1]), **r} for t, r in enumerate(results)]


def task_metrics(result: dict, finite_only: bool = True) -> dict[str, float]:
    """The scalar metrics of a task result (a :meth:`TaskResult.to_dict`): what Tune and MLflow receive after
    each task (MLflow at step = task index). ``finite_only=False`` keeps NaN where a metric is undefined yet
    (forgetting after the first task), so every task's metrics have the same keys."""
    m: dict[str, Any] = {k: result[k] for k in (
        "pooled_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer", "train_loss",
        "task_seconds", "images_per_second", "peak_memory_mb")}
    # Absent from a result stored before they existed (read through with_task_mean they are there).
    m.update({k: result.get(k) for k in ("task_mean_accuracy", "average_incremental_accuracy_task_mean")})
    m.update({f"accuracy_task_{j}": a for j, a in enumerate(result["accuracy"])})
    m.update({f"own_head_accuracy_task_{j}": a for j, a in enumerate(result["own_head_accuracy"])})
    for layer, dim in enumerate(result.get("info", {}).get("memory_dims", [])):
        m[f"memory_dim_layer_{layer:02d}"] = dim
    out = {k: float(v) for k, v in m.items() if v is not None}
    return {k: v for k, v in out.items() if not math.isnan(v)} if finite_only else out


@dataclass
class TaskProgress:
    """The task being trained: epochs done, optimizer and gradient-scaler state, per-epoch losses and timings,
    and what ``prepare_task`` returned. Saved in mid-task checkpoints (as a plain dict of tensors and plain
    types)."""
    task: int
    info: dict = field(default_factory=dict)
    epochs_done: int = 0
    optimizer: Optional[dict] = None
    scaler: Optional[dict] = None  # the fp16 gradient scaler's state (None for fp32 and bf16)
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images: int = 0
    elapsed: float = 0.0  # seconds spent on the task before the current process took it over
    # The current adapter's tensors per layer (only in a checkpoint; restored into the model on load).
    adapters: Optional[list[dict[str, torch.Tensor]]] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "TaskProgress":
        return cls(**state)
