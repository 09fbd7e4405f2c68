"""Continual-learning metrics from the accuracy matrix.

``acc[i][j]``: top-1 accuracy (in [0, 1]) on task j's test set after training task i, for j <= i.

The literature uses two definitions of "accuracy after task i"; both are computed, under names that say which:

* **pooled**: correct / total over the test images of all tasks seen so far (every seen class's test images
  together, so a task with more test images weighs more). The official code of InfLoRA (Liang & Li, CVPR 2024)
  and SD-LoRA (Wu et al., ICLR 2025) reports this one. Keys: ``pooled_accuracy``, ``final_accuracy``,
  ``average_incremental_accuracy`` (kept without a suffix: stored results and MLflow histories use them).
* **task-mean**: the mean over the seen tasks j <= i of ``acc[i][j]`` (every task weighs the same). The
  official code of L2P (Wang et al., CVPR 2022), DualPrompt (Wang et al., ECCV 2022) and CODA-Prompt (Smith et
  al., CVPR 2023) reports this one. Keys: ``task_mean_accuracy``, ``final_accuracy_task_mean``,
  ``average_incremental_accuracy_task_mean``.

The two agree when every task has the same number of test images and differ otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class AccuracyCounts:
    """Per-task correct/total counts after each task; the accuracy matrix and pooled accuracy derive from it."""
    correct: list[list[int]] = field(default_factory=list)  # correct[i][j], j <= i
    total: list[list[int]] = field(default_factory=list)

    def add_row(self, correct: list[int], total: list[int]) -> None:
        """Add the evaluation after task ``i = len(self.correct)`` over tasks 0..i."""
        i = len(self.correct)
        if len(correct) != i + 1 or len(total) != i + 1:
            raise ValueError(f"row {i} must have {i + 1} entries, got {len(correct)}/{len(total)}")
        if any(t <= 0 for t in total):
            raise ValueError(f"row {i}: every task needs test samples, got totals {total}")
        self.correct.append([int(c) for c in correct])
        self.total.append([int(t) for t in total])

    @property
    def num_tasks(self) -> int:
        return len(self.correct)

    def matrix(self) -> list[list[float]]:
        """Lower-triangular accuracy matrix (row i has i + 1 entries)."""
        return [[c / t for c, t in zip(cr, tr)] for cr, tr in zip(self.correct, self.total)]

    def pooled_accuracy(self) -> list[float]:
        """Pooled accuracy after each task: correct / total over the test images of all seen tasks together."""
        return [sum(cr) / sum(tr) for cr, tr in zip(self.correct, self.total)]

    def task_mean_accuracy(self) -> list[float]:
        """Task-mean accuracy after each task: the mean over the seen tasks of each one's accuracy
        (:func:`task_mean_accuracy`)."""
        return task_mean_accuracy(self.matrix())

    def to_dict(self) -> dict:
        return {"correct": self.correct, "total": self.total}

    @classmethod
    def from_dict(cls, d: dict) -> "AccuracyCounts":
        return cls(correct=[list(r) for r in d["correct"]], total=[list(r) for r in d["total"]])


def task_mean_accuracy(acc: list[list[float]]) -> list[float]:
    """Task-mean accuracy after each task i: ``mean over j <= i of acc[i][j]`` (L2P, DualPrompt and CODA-Prompt
    report this; each seen task weighs the same whatever its number of test images)."""
    return [sum(row) / len(row) for row in acc]


def final_accuracy(per_task: list[float]) -> float:
    """A_T: the accuracy after the last task. Given :meth:`AccuracyCounts.pooled_accuracy` it is the pooled
    A_T (key ``final_accuracy``); given :func:`task_mean_accuracy`, the task-mean A_T
    (``final_accuracy_task_mean``)."""
    return per_task[-1]


def average_incremental_accuracy(per_task: list[float]) -> float:
    """The mean over tasks of the accuracy after each task. Given the pooled accuracies it is the pooled
    average incremental accuracy (key ``average_incremental_accuracy``); given :func:`task_mean_accuracy`, the
    task-mean one (``average_incremental_accuracy_task_mean``)."""
    return sum(per_task) / len(per_task)


def forgetting(acc: list[list[float]]) -> float:
    """Average forgetting (Chaudhry et al. 2018) after the last task T-1:
    mean over j < T-1 of ``max_{l in [j, T-2]} acc[l][j] - acc[T-1][j]``. NaN with one task."""
    t = len(acc)
    if t < 2:
        return math.nan
    last = acc[-1]
    drops = [max(acc[l][j] for l in range(j, t - 1)) - last[j] for j in range(t - 1)]
    return sum(drops) / len(drops)


def backward_transfer(acc: list[list[float]]) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): mean over j < T-1 of ``acc[T-1][j] - acc[j][j]``. NaN with one task."""
    t = len(acc)
    if t < 2:
        return math.nan
    return sum(acc[-1][j] - acc[j][j] for j in range(t - 1)) / (t - 1)


def summary(counts: AccuracyCounts) -> dict:
    """All headline metrics of a (possibly partial) run: both accuracy definitions (pooled: no suffix,
    task-mean: ``_task_mean``), each after every task, at the last task and averaged over tasks."""
    pooled = counts.pooled_accuracy()
    acc = counts.matrix()
    return {
        "final_accuracy": final_accuracy(pooled),
        "average_incremental_accuracy": average_incremental_accuracy(pooled),
        **task_mean_summary(acc),
        "forgetting": forgetting(acc),
        "backward_transfer": backward_transfer(acc),
        "pooled_accuracy": pooled,
        "accuracy_matrix": acc,
    }


def task_mean_summary(acc: list[list[float]]) -> dict:
    """The task-mean metrics of :func:`summary` from the accuracy matrix alone (which results stored before
    they existed hold): ``task_mean_accuracy`` after each task, ``final_accuracy_task_mean`` and
    ``average_incremental_accuracy_task_mean``."""
    task_mean = task_mean_accuracy(acc)
    return {"final_accuracy_task_mean": final_accuracy(task_mean),
            "average_incremental_accuracy_task_mean": average_incremental_accuracy(task_mean),
            "task_mean_accuracy": task_mean}


# The final metrics of a run, averaged over seeds by aggregate_over_seeds and tabled by the report.
FINAL_METRIC_KEYS = ("final_accuracy", "final_accuracy_task_mean", "average_incremental_accuracy",
                     "average_incremental_accuracy_task_mean", "forgetting", "backward_transfer")


def aggregate_over_seeds(summaries: list[dict]) -> dict[str, float]:
    """Mean and sample std over runs (seeds) of the final metrics (:data:`FINAL_METRIC_KEYS`, both accuracy
    definitions) as ``<metric>_mean`` / ``<metric>_std``; runs that failed (None) are skipped, and so is a
    metric a run lacks or has as NaN."""
    import statistics

    agg = {}
    for key in FINAL_METRIC_KEYS:
        vals = [s[key] for s in summaries if s and s.get(key) is not None and not math.isnan(s[key])]
        if vals:
            agg[f"{key}_mean"] = statistics.fmean(vals)
            agg[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return agg


def format_matrix(acc: list[list[float]]) -> str:
    """The accuracy matrix as a fixed-width text table (percent)."""
    n = len(acc)
    lines = ["after\\on " + " ".join(f"{f'T{j}':>6}" for j in range(n))]
    for i, row in enumerate(acc):
        cells = " ".join(f"{100 * a:6.2f}" for a in row) + " " * 7 * (n - len(row))
        lines.append(f"{f'T{i}':>8} {cells}".rstrip())
    return "\n".join(lines)
