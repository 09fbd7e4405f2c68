"""Continual-learning metrics from the accuracy matrix.

``acc[i][j]``: top-1 accuracy (in [0, 1]) on task j's test set after training task i, for j <= i.
Pooled accuracy after task i: correct / total over the test samples of all tasks seen so far.
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
        """Accuracy over the pooled test samples of all seen classes, after each task."""
        return [sum(cr) / sum(tr) for cr, tr in zip(self.correct, self.total)]

    def to_dict(self) -> dict:
        return {"correct": self.correct, "total": self.total}

    @classmethod
    def from_dict(cls, d: dict) -> "AccuracyCounts":
        return cls(correct=[list(r) for r in d["correct"]], total=[list(r) for r in d["total"]])


def final_accuracy(pooled: list[float]) -> float:
    """A_T: pooled accuracy over all seen classes after the last task."""
    return pooled[-1]


def average_incremental_accuracy(pooled: list[float]) -> float:
    """Mean over tasks of the pooled accuracy after each task."""
    return sum(pooled) / len(pooled)


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
    """All headline metrics of a (possibly partial) run."""
    pooled = counts.pooled_accuracy()
    acc = counts.matrix()
    return {
        "final_accuracy": final_accuracy(pooled),
        "average_incremental_accuracy": average_incremental_accuracy(pooled),
        "forgetting": forgetting(acc),
        "backward_transfer": backward_transfer(acc),
        "pooled_accuracy": pooled,
        "accuracy_matrix": acc,
    }


def aggregate_over_seeds(summaries: list[dict]) -> dict[str, float]:
    """Mean and sample std over runs (seeds) of the final metrics; runs that failed (None) are skipped."""
    import statistics

    agg = {}
    for key in ("final_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer"):
        vals = [s[key] for s in summaries if s and not math.isnan(s[key])]
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
