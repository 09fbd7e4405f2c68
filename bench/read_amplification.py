"""Bytes read from the shard store per task, against the task's bytes for one worker, over several epochs.

    python bench/read_amplification.py --classes 40 --per-class 40 --epochs 3 --loader-workers 2 \
        --ray-workers 2 --shard-cache-mb 1

Generates JPEGs in ImageNet-R's folder layout, prepares Parquet shards from them (``inflora-data prepare``),
then trains-reads one worker's block of task 0 (rank 0 of ``--ray-workers``) for ``--epochs`` epochs with
``--loader-workers`` DataLoader processes, as a Ray Train worker does: the training batches of each epoch
(decode + training augmentation), through the project's loaders. Every byte read from a shard file is
counted, in this process and in every loader process (the store's filesystem is wrapped by a
``sitecustomize`` module that each new Python process imports, and that forked processes inherit).

Printed: bytes read from the store divided by the worker's bytes of the task (the compressed size of the row
groups holding its block: what a reader that fetches each row group once reads), target <= 1.05; and
samples/s per core of the first epoch (which includes reading from the store and starting loader processes)
and of the later ones (cores: the loader processes, or 1 with ``--loader-workers 0``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time

import numpy as np

from common import machine
from loader import synthetic_jpeg
from read_counter import bytes_logged

# Imported by every Python process started while the benchmark runs (loader processes, a fork server): it
# wraps inflora_ray.storage.filesystem so that every byte read from a .parquet file is appended to a log.
SITECUSTOMIZE = textwrap.dedent('''
    import os
    if os.environ.get("INFLORA_READ_LOG"):
        import read_counter
        read_counter.install()
''')


def make_dataset(root: str, classes: int, per_class: int, side: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = os.path.join(root, f"n{c:08d}")
        os.makedirs(folder)
        for i in range(per_class):
            with open(os.path.join(folder, f"img_{i}.jpg"), "wb") as f:
                f.write(synthetic_jpeg(rng, side, cell=16))


def block_bytes(shards: str, source, block) -> int:
    """Compressed bytes of the row groups that hold ``block`` (all columns)."""
    import pyarrow.parquet as pq

    total, meta = 0, {}
    for path, g in source.row_groups_of(block):
        if path not in meta:
            meta[path] = pq.ParquetFile(os.path.join(shards, *path.split("/"))).metadata
        rg = meta[path].row_group(g)
        total += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=40)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--side", type=int, nargs=2, default=(160, 240), help="image side range, px")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--num-tasks", type=int, default=2)
    p.add_argument("--rows-per-group", type=int, default=16)
    p.add_argument("--rows-per-file", type=int, default=256)
    p.add_argument("--shard-cache-mb", type=int, default=1, help="per-process row-group cache (data.shard_cache_mb)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--ray-workers", type=int, default=2, help="the block is rank 0's of this many workers")
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="read-amp-")
    hook = os.path.join(tmp, "hook")
    os.makedirs(hook)
    with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    log_path = os.path.join(tmp, "reads.log")
    os.environ["PYTHONPATH"] = os.pathsep.join([hook] + [x for x in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if x] + [os.path.dirname(os.path.abspath(__file__))])
    sys.path.insert(0, hook)

    from inflora_ray.config import DataConfig
    from inflora_ray.data import build_benchmark
    from inflora_ray.data import loader as L
    from inflora_ray.data.shard_writer import prepare_shards

    raw, shards = os.path.join(tmp, "raw"), os.path.join(tmp, "shards")
    make_dataset(raw, args.classes, args.per_class, tuple(args.side))
    prepare_shards("imagenet-r", raw, shards, rows_per_group=args.rows_per_group, rows_per_file=args.rows_per_file,
                   num_tasks=args.num_tasks)
    bm = build_benchmark(DataConfig(benchmark="imagenet-r", shards=shards, num_tasks=args.num_tasks,
                                    shard_cache_mb=args.shard_cache_mb), args.img_size)
    os.environ["INFLORA_READ_LOG"] = log_path
    import sitecustomize  # noqa: F401  (wraps the store's filesystem in this process too)
    indices = bm.task_indices("train", 0)
    start, end = L.block_bounds(len(indices), 0, args.ray_workers)
    block = indices[start:end]
    mine = block_bytes(shards, bm.train, block)
    dataset = L.TaskDataset(bm.train, bm.preprocess, bm.label_map())
    staged = hasattr(L, "PassLoader")  # this version stages a worker's block once per task
    seconds = []
    if staged:
        from inflora_ray.data.blocks import BlockCache

        cache = BlockCache(max_bytes=1 << 30)
        t0 = time.perf_counter()
        source = cache.stage(dataset.source, L.worker_block(indices, 0, args.ray_workers))
        loader = L.PassLoader(L.TaskDataset(source, dataset.preprocess, dataset.label_map), args.loader_workers)
    for epoch in range(args.epochs):
        batches = L.train_batches(indices, args.batch, seed=0, task=0, epoch=epoch, rank=0,
                                  world_size=args.ray_workers)
        if not staged or epoch:
            t0 = time.perf_counter()
        passes = loader.run(batches) if staged else L.make_loader(dataset, batches, args.loader_workers)
        n = sum(len(y) for _, y in passes)
        seconds.append(time.perf_counter() - t0)
        assert n == len(block)
    if staged:
        loader.close()
        cache.close()
    read = bytes_logged(log_path)
    cores = max(1, args.loader_workers)
    first = len(block) / seconds[0] / cores
    later = [len(block) / s / cores for s in seconds[1:]]
    print(f"machine: {machine()}")
    print(f"code: {'staged blocks, persistent forkserver loader processes' if staged else 'per-process row-group LRU, loader processes per epoch'}")
    print(f"task 0: {len(indices)} train samples; worker 0 of {args.ray_workers}: {len(block)} samples in "
          f"{len(bm.train.row_groups_of(block))} row groups, {mine / 2**20:.2f} MiB; "
          f"row-group cache {args.shard_cache_mb} MiB per process; {args.loader_workers} loader processes; "
          f"{args.epochs} epochs")
    print(f"bytes read from the store: {read / 2**20:.2f} MiB = {read / mine:.3f} x the worker's bytes of the task "
          f"(target <= 1.05)")
    print(f"samples/s per core: first epoch {first:.1f}; later epochs "
          f"{', '.join(f'{v:.1f}' for v in later) or '-'}")


if __name__ == "__main__":
    main()
