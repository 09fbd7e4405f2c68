"""Per-worker batches with worker-count-independent randomness.

Each of W workers owns one contiguous block of every task's samples (in dataset order) and only ever reads
those: its block. Training: one seeded permutation per (seed, task, epoch) cuts the task's data into *global*
batches, the same for any W; each worker trains on the members of every global batch that it owns (possibly
none). The loss is scaled so that the sum of the workers' gradients is exactly the global batch's mean
gradient, so 1 and W workers follow the same trajectory up to float summation order. Each sample's
augmentation is seeded by (seed, task, augmentation stream, sample index); the stream is the training epoch
0..K-1, or a negative id for a covariance pass (which sees the training augmentation too).

Loading: a worker stages its block of a task once (:mod:`.blocks`: read from the store once, kept on local
disk) and makes one :class:`PassLoader` over it; each pass over the block (covariance passes, epochs) is
``PassLoader.run(batches)``. Its loader processes start once, with ``forkserver`` (never ``fork``: the
parent may have initialised an object-store client, which is not fork-safe), and persist until ``close()``.
"""
from __future__ import annotations

import multiprocessing
import sys
import types
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .base import ImageSource
from .transforms import Preprocess

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, task: int, aug_stream: int, indices: np.ndarray) -> np.ndarray:
    """A 63-bit augmentation seed per sample, a hash of (seed, task, aug_stream, index).

    ``aug_stream``: the augmentation stream, a training epoch 0..K-1 or a negative id of a covariance pass.
    """
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(task + 1))
    key = _splitmix64(key ^ np.uint64(aug_stream + 1_000_003))
    return (_splitmix64(key ^ indices.astype(np.uint64)) >> np.uint64(1)).astype(np.int64)


def epoch_permutation(indices: np.ndarray, seed: int, task: int, epoch: int) -> np.ndarray:
    """The order in which a task's training samples are visited in an epoch."""
    rng = np.random.Generator(np.random.PCG64([seed, task, epoch]))
    return indices[rng.permutation(len(indices))]


def block_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) positions of worker ``rank``'s contiguous block (sizes differ by at most one)."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def worker_block(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The indices of worker ``rank``'s block: what :func:`train_batches` and :func:`pass_batches` give it."""
    start, end = block_bounds(len(indices), rank, world_size)
    return np.asarray(indices)[start:end]


def train_batches(indices: np.ndarray, batch_size: int, seed: int, task: int, epoch: int,
                  rank: int = 0, world_size: int = 1) -> list[list[tuple[int, int]]]:
    """This worker's (index, aug seed) members of every global batch of an epoch.

    A list is empty when the worker owns none of that global batch's samples, which can happen in any step
    (a random cut of the task against fixed blocks), most often with small batches or many workers; the
    training step then skips the forward and joins the gradient all-reduce with zeros
    (:func:`inflora_ray.training.step.train_step`).
    """
    indices = np.asarray(indices)
    positions = epoch_permutation(np.arange(len(indices)), seed, task, epoch)
    start, end = block_bounds(len(indices), rank, world_size)
    seeds = sample_seeds(seed, task, epoch, indices[positions])
    batches = []
    for b in range(0, len(positions), batch_size):
        pos, sd = positions[b:b + batch_size], seeds[b:b + batch_size]
        mine = (pos >= start) & (pos < end)
        batches.append([(int(indices[p]), int(s)) for p, s in zip(pos[mine], sd[mine])])
    return batches


def global_batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Size of each global batch of an epoch (matching :func:`train_batches`)."""
    return [min(batch_size, num_samples - s) for s in range(0, num_samples, batch_size)]


def pass_batches(indices: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: Optional[int] = None, task: int = 0, aug_stream: int = 0) -> list[list[tuple[int, int]]]:
    """This worker's block of ``indices`` in fixed-size batches (evaluation, covariance passes). No batch is
    empty: a worker whose block is empty (fewer samples than workers) gets no batch at all.

    With ``seed`` set, each item carries its augmentation seed (training transform), drawn from
    ``aug_stream``: the augmentation stream, a training epoch 0..K-1 or a negative id of a covariance pass.
    Without ``seed``, each item carries -1 (test transform).
    """
    start, end = block_bounds(len(indices), rank, world_size)
    block = np.asarray(indices)[start:end]
    seeds = (sample_seeds(seed, task, aug_stream, block) if seed is not None
             else np.full(len(block), -1, dtype=np.int64))
    return [[(int(i), int(s)) for i, s in zip(block[b:b + batch_size], seeds[b:b + batch_size])]
            for b in range(0, len(block), batch_size)]


class TaskDataset(Dataset):
    """Items are ``(index, aug_seed)``; aug_seed >= 0 applies the training transform seeded by it, -1 the test
    transform. Returns (image float CHW, incremental label)."""

    def __init__(self, source: ImageSource, preprocess: Preprocess, label_map: np.ndarray):
        self.source = source
        self.preprocess = preprocess
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]):
        index, aug_seed = item
        img = self.source.load(index)
        if aug_seed >= 0:
            gen = torch.Generator().manual_seed(int(aug_seed))
            x = self.preprocess.train(img, gen)
        else:
            x = self.preprocess.test(img)
        return x, int(self.label_map[int(self.source.labels[index])])


class _Collate:
    """Stack (image, label) pairs; an empty batch (this worker owns none of a global batch) gives empty tensors."""

    def __init__(self, image_shape: tuple[int, ...]):
        self.image_shape = image_shape

    def __call__(self, items):
        if not items:
            return torch.empty((0, *self.image_shape)), torch.empty(0, dtype=torch.long)
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def main_script_imports() -> list[str]:
    """The modules, already imported here, that the main script's namespace holds or took names from.

    A ``forkserver`` (or ``spawn``) child runs the main script again (as ``__mp_main__``) before anything else.
    With these preloaded in the fork server, that re-run finds its imports done: in a Ray worker the main
    script is Ray's worker, whose imports cost about a second of CPU in each loader process otherwise."""
    main = sys.modules.get("__main__")
    names = set()
    for value in vars(main).values() if main is not None else ():
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and name in sys.modules and not name.startswith("__"):
            names.add(name)
    return sorted(names)


def loader_context():
    """The multiprocessing context of loader processes: ``forkserver`` (``spawn`` where there is none).

    ``fork`` would copy the parent's threads and client state (an object store's SDK, Ray's own threads) into
    each child, which is not safe. The fork server preloads this module and the main script's imports
    (:func:`main_script_imports`), so its children start with torch and the rest already imported."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*main_script_imports(), __name__])
    return ctx


def make_loader(dataset: TaskDataset, batches: Sequence[list[tuple[int, int]]], loader_workers: int = 0,
                pin_memory: bool = False) -> Iterator:
    """A DataLoader over precomputed batches (decode/augment in ``loader_workers`` processes; 0: in this one),
    for a single pass; :class:`PassLoader` keeps its processes for many."""
    size = dataset.preprocess.img_size
    return DataLoader(dataset, batch_sampler=list(batches), num_workers=loader_workers, pin_memory=pin_memory,
                      persistent_workers=False, collate_fn=_Collate((3, size, size)),
                      multiprocessing_context=loader_context() if loader_workers else None)


class _Batches:
    """The batch sampler of a :class:`PassLoader`: the batches of the pass being run."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PassLoader:
    """Many passes over one dataset (a worker's staged block) with the same loader processes.

    ``run(batches)`` iterates one pass (batches of (index, aug seed), possibly empty); the ``loader_workers``
    processes start on the first pass, persist across passes and stop at ``close()`` (also on ``with``).
    ``worker_init_fn`` runs in each loader process as it starts (diagnostics, benchmarks).
    """

    def __init__(self, dataset: TaskDataset, loader_workers: int = 0, pin_memory: bool = False,
                 worker_init_fn: Optional[Callable[[int], None]] = None):
        self.dataset = dataset
        self._batches = _Batches()
        size = dataset.preprocess.img_size
        self._loader: Optional[DataLoader] = DataLoader(
            dataset, batch_sampler=self._batches, num_workers=loader_workers, pin_memory=pin_memory,
            persistent_workers=loader_workers > 0, collate_fn=_Collate((3, size, size)),
            worker_init_fn=worker_init_fn, multiprocessing_context=loader_context() if loader_workers else None)

    def run(self, batches: Sequence[list[tuple[int, int]]]) -> Iterator:
        """One pass over ``batches``: yields (images, labels) per batch."""
        if self._loader is None:
            raise RuntimeError("PassLoader.run after close()")
        self._batches.batches = list(batches)
        return iter(self._loader)

    def close(self) -> None:
        """Stop the loader processes."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader = None

    def __enter__(self) -> "PassLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
