"""Benchmarks as image sources + class order + task split; shared by every dataset."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

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
    scanned: Any = None  # the ScannedData it was built from (shipped to workers and trials instead of a rescan)
    eval_split: str = "test"  # what ``test`` holds: the test images, or "validation" (held out of the training data)

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


# ---------------------------------------------------------------------------------------------------------
# Shared by the real datasets (CIFAR-100, ImageNet-R, DomainNet) and the Parquet shards
# ---------------------------------------------------------------------------------------------------------

class DataError(ValueError):
    """A dataset that cannot be used as configured (missing files, wrong layout, altered copy); the message
    says what was expected and how to fix it."""


def decode_image(data: bytes, name: str, fix: str) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 RGB tensor (3, H, W).

    A file that cannot be decoded raises DataError naming ``name`` (where the bytes came from) and saying
    ``fix`` (what to do about it).
    """
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, DecompressionBombError, ...)
        raise DataError(f"cannot decode image {name} ({type(e).__name__}: {e}); {fix}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def label_sorted_order(labels: np.ndarray) -> np.ndarray:
    """Stable order of samples by label: a class's samples keep their dataset order and form one block."""
    return np.argsort(np.asarray(labels), kind="stable")


@dataclass
class FileSource:
    """Image files under ``root`` (relative POSIX paths), decoded lazily; samples ordered by label.

    Picklable (plain strings and arrays). ``encoded(i)`` gives the file's original bytes (for Parquet shards).
    """
    root: str
    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def _full(self, index: int) -> str:
        import os

        return os.path.join(self.root, *self.paths[index].split("/"))

    def encoded(self, index: int) -> tuple[bytes, str]:
        """(original file bytes, format) of sample ``index``."""
        path = self._full(index)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"image file missing: {path} (listed in the dataset; is the copy complete?)") from None
        except OSError as e:
            raise DataError(f"image file unreadable: {path} ({type(e).__name__}: {e}); check its permissions, "
                            f"or restore it from the dataset's release") from None
        ext = self.paths[index].rsplit(".", 1)[-1].lower()
        return data, {"jpg": "jpeg", "jpeg": "jpeg"}.get(ext, ext)

    def key(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int) -> torch.Tensor:
        data, _ = self.encoded(index)
        return decode_image(data, self._full(index), "the file is damaged or truncated: restore it from the "
                                                     "dataset's release")
