"""Benchmarks as image sources + class order + task split; shared by every dataset."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from .transforms import Preprocess


class ImageSource(Protocol):
    """A split of a dataset: ``labels`` (int64 array, original label ids) and ``load(i)`` -> uint8 (C, H, W)."""
    labels: np.ndarray

    def __len__(self) -> int: ...

    def load(self, index: int) -> torch.Tensor: ...


@dataclass
class TensorSource:
    """Images held in memory as a uint8 (N, C, H, W) tensor."""
    images: torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]


def resolve_class_order(num_classes: int, class_order: Optional[Sequence[int]] = None,
                        class_order_seed: Optional[int] = None) -> list[int]:
    """The order in which classes arrive: natural (0..n-1), a seeded shuffle, or an explicit permutation."""
    if class_order is not None:
        order = [int(c) for c in class_order]
        if sorted(order) != list(range(num_classes)):
            raise ValueError(f"data.class_order must be a permutation of 0..{num_classes - 1} "
                             f"({num_classes} classes), got {len(order)} entries")
        return order
    if class_order_seed is not None:
        return [int(c) for c in np.random.RandomState(class_order_seed).permutation(num_classes)]
    return list(range(num_classes))


def split_tasks(class_order: Sequence[int], num_tasks: int) -> list[list[int]]:
    """Consecutive, near-equal chunks of the class order, one per task."""
    if not 1 <= num_tasks <= len(class_order):
        raise ValueError(f"data.num_tasks={num_tasks} must be between 1 and the number of classes "
                         f"({len(class_order)})")
    return [[int(c) for c in chunk] for chunk in np.array_split(np.asarray(class_order), num_tasks)]


@dataclass
class Benchmark:
    """A class-incremental benchmark: train/test sources, preprocessing, and the task split."""
    name: str
    train: ImageSource
    test: ImageSource
    class_names: list[str]
    preprocess: Preprocess
    class_order: list[int]
    tasks: list[list[int]]  # original class ids per task
    manifest: dict  # provenance: source, split, checksums (recorded with each run)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def label_map(self) -> np.ndarray:
        """Original label id -> incremental label (position in the class order)."""
        m = np.empty(len(self.class_order), dtype=np.int64)
        m[np.asarray(self.class_order)] = np.arange(len(self.class_order))
        return m

    def task_offset(self, task: int) -> int:
        """Incremental label of the first class of ``task``."""
        return sum(len(t) for t in self.tasks[:task])

    def task_indices(self, split: str, task: int) -> np.ndarray:
        """Sorted sample indices of ``split`` ("train"/"test") whose class belongs to ``task``."""
        source = self.train if split == "train" else self.test
        return np.flatnonzero(np.isin(source.labels, self.tasks[task])).astype(np.int64)
