"""A held-out validation split of the training data (``data.val_fraction``): a seeded, class-stratified part
of every class's training images that the run does not train on and is evaluated on instead of the test
images, so that a sweep can choose its winner without looking at the test set.

The part held out depends only on the labels, the fraction and ``data.val_seed``: every trial and every seed
of a sweep holds out the same images, and runs on one worker or many see the same split.
"""
from __future__ import annotations

import numpy as np
import torch


def holdout_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): sorted indices of ``labels``. From each class, ``round(fraction * n)`` images (at
    least one, and never the class's last image) are drawn at random, class after class in label order from
    one generator seeded with ``seed``: the same labels, fraction and seed always give the same split."""
    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.RandomState(seed)
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(rng.permutation(members)[:n])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out, assume_unique=True)
    return kept.astype(np.int64), held_out.astype(np.int64)


class SubsetSource:
    """The samples ``indices`` of ``base`` (any image source) as a source of their own: sample ``i`` is
    ``base``'s sample ``indices[i]``. ``part`` names the subset (it keeps staged blocks of two subsets of one
    split apart)."""

    def __init__(self, base, indices: np.ndarray, part: str):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(base.labels)[self.indices]
        self.part = part

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> torch.Tensor:
        """Sample ``index`` decoded (``base``'s sample ``indices[index]``)."""
        return self.base.load(int(self.indices[index]))


class EncodedSubset(SubsetSource):
    """A subset of a source that also gives its samples' encoded bytes (image files, Parquet shards): decoding
    on the GPU stays available."""

    def encoded(self, index: int) -> tuple[bytes, str]:
        """(encoded bytes, format) of sample ``index``."""
        return self.base.encoded(int(self.indices[index]))


class ShardSubset(EncodedSubset):
    """A subset of Parquet shards: blocks of it are staged on local disk as blocks of the shards are
    (:class:`~inflora_ray.data.blocks.BlockCache`), reading each row group once."""

    @property
    def uri(self) -> str:
        return self.base.uri

    @property
    def split(self) -> str:
        return f"{self.base.split}:{self.part}"

    def read_rows(self, indices):
        """Yield (index, encoded bytes, format) for ``indices`` (of this subset), in increasing order."""
        ours = np.unique(np.asarray(indices, dtype=np.int64))
        back = dict(zip(self.indices[ours].tolist(), ours.tolist()))  # indices are sorted: order is kept
        for base_index, data, fmt in self.base.read_rows(self.indices[ours]):
            yield back[int(base_index)], data, fmt

    def estimated_bytes(self, indices) -> int:
        """About how many bytes of shard files ``indices`` (of this subset) take."""
        return self.base.estimated_bytes(self.indices[np.asarray(indices, dtype=np.int64)])


def subset(base, indices: np.ndarray, part: str) -> SubsetSource:
    """``base`` restricted to ``indices``, keeping what ``base`` can do beyond loading (encoded bytes, staged
    blocks)."""
    if hasattr(base, "read_rows"):
        return ShardSubset(base, indices, part)
    if hasattr(base, "encoded"):
        return EncodedSubset(base, indices, part)
    return SubsetSource(base, indices, part)


def split_off_validation(train, fraction: float, seed: int) -> tuple[SubsetSource, SubsetSource, dict]:
    """(training part, validation part, what was held out): ``train`` split by :func:`holdout_indices`."""
    kept, held_out = holdout_indices(train.labels, fraction, seed)
    tag = f"{fraction:g}@{seed}"
    info = {"eval_split": "validation", "val_fraction": fraction, "val_seed": seed,
            "train_images": len(kept), "val_images": len(held_out)}
    return subset(train, kept, f"fit{tag}"), subset(train, held_out, f"val{tag}"), info
