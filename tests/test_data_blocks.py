"""A worker's block of a task is read from the shard store once per task (staged on local disk), whatever the
number of epochs and loader processes; the samples are the same as read straight from the shards."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import torch

from helpers import (READ_LOG_ENV, bytes_logged, count_reads_in_loader_process, counting_filesystem, noise_png_shards,
                     tiny_overrides)
from inflora_ray import storage
from inflora_ray.config import DataConfig
from inflora_ray.data import build_benchmark
from inflora_ray.data.blocks import BlockCache, StagedSource
from inflora_ray.data.loader import PassLoader, TaskDataset, make_loader, train_batches, worker_block
from inflora_ray.presets import load_config
from inflora_ray.training.learner import ContinualLearner


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of a 4-class ImageNet-R-layout folder of 160 px noise PNGs (about 75 KB each), row groups of 4."""
    return noise_png_shards(tmp_path_factory.mktemp("blocks"), per_class=25, side=160)


def _bm(shards):
    return build_benchmark(DataConfig(benchmark="imagenet-r", shards=str(shards), num_tasks=2, shard_cache_mb=1), 32)


def _stored_bytes(shards, source, block) -> int:
    """Compressed bytes of the row groups holding ``block``: what fetching each of them once reads."""
    total = 0
    for path, g in source.row_groups_of(block):
        rg = pq.ParquetFile(os.path.join(shards, *path.split("/"))).metadata.row_group(g)
        total += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
    return total


def test_block_read_from_store_once_for_all_epochs_and_loader_processes(shards, tmp_path, monkeypatch):
    bm = _bm(shards)
    log = tmp_path / "reads.log"
    monkeypatch.setenv(READ_LOG_ENV, str(log))
    monkeypatch.setattr(storage, "filesystem", counting_filesystem(storage.filesystem))
    indices = bm.task_indices("train", 0)
    block = worker_block(indices, 0, 2)
    dataset = TaskDataset(bm.train, bm.preprocess, bm.label_map())
    cache = BlockCache(str(tmp_path / "blocks"), 64 << 20)
    staged = cache.stage(bm.train, block)
    assert isinstance(staged, StagedSource) and cache.store_reads == 1
    got = []
    with PassLoader(TaskDataset(staged, bm.preprocess, bm.label_map()), loader_workers=2,
                    worker_init_fn=count_reads_in_loader_process) as loader:
        for epoch in range(3):
            batches = train_batches(indices, 8, seed=5, task=0, epoch=epoch, rank=0, world_size=2)
            got.append([(x, y) for x, y in loader.run(batches)])
    ratio = bytes_logged(log) / _stored_bytes(shards, bm.train, block)
    assert 0.5 < ratio <= 1.05, ratio  # the block's row groups once (plus each file's footer), not per epoch
    # The same images and labels, bit for bit, as read straight from the shards in this process.
    for epoch in range(3):
        batches = train_batches(indices, 8, seed=5, task=0, epoch=epoch, rank=0, world_size=2)
        want = list(make_loader(dataset, batches, loader_workers=0))
        assert len(want) == len(got[epoch])
        for (x, y), (x2, y2) in zip(want, got[epoch]):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    # Staging the same block again reads nothing; the folder is removed with the cache.
    assert cache.stage(bm.train, block) is staged and cache.store_reads == 1
    folder = cache.folder
    cache.close()
    assert not os.path.exists(folder)


def test_block_cache_is_bounded(shards, tmp_path):
    bm = _bm(shards)
    blocks = [worker_block(bm.task_indices("train", t), 0, 1) for t in range(2)]
    size = bm.train.estimated_bytes(blocks[0])
    cache = BlockCache(str(tmp_path), int(size * 1.5))
    first = cache.stage(bm.train, blocks[0])
    assert isinstance(first, StagedSource)
    # in use: the second block does not fit beside it, so it is read from the store as before
    assert cache.stage(bm.train, blocks[1]) is bm.train
    del first
    second = cache.stage(bm.train, blocks[1])  # the first is no longer used: evicted to make room
    assert isinstance(second, StagedSource) and len(os.listdir(cache.folder)) == 1
    assert cache.used_bytes <= cache.max_bytes
    assert BlockCache(str(tmp_path), 0).stage(bm.train, blocks[0]) is bm.train  # 0: staging off
    with pytest.raises(KeyError, match="not in this worker's staged block"):
        second.load(int(blocks[0][0]))
    cache.close()


def test_learner_with_loader_processes_equals_in_process(shards, tmp_path):
    """A whole continual run from shards: 2 persistent loader processes give exactly the in-process results."""
    results = []
    for workers in (0, 2):
        cfg = load_config("quickstart", tiny_overrides(**{
            "data.benchmark": "imagenet-r", "data.shards": str(shards), "data.num_tasks": 2,
            "data.loader_workers": workers, "data.batch_size": 16, "data.block_cache_dir": str(tmp_path)}))
        learner = ContinualLearner(cfg)
        learner.run()
        results.append((learner.counts.correct, [r.train_loss for r in learner.task_results]))
        assert learner.blocks.store_reads == 4  # each task's train and test block once (2 tasks)
        learner.blocks.close()
    assert results[0] == results[1]


def test_loader_processes_find_the_main_scripts_imports_done(tmp_path):
    """A forkserver child runs the main script again before anything else; the fork server preloads what
    that script imported, so the child imports none of it itself (in a Ray worker, Ray's own imports: about a
    second of CPU per loader process). ``probe_mod`` records the pid of each process that imports it."""
    import subprocess
    import sys

    log = tmp_path / "imported_by.txt"
    (tmp_path / "probe_mod.py").write_text(f"import os\nopen({str(log)!r}, 'a').write(f'{{os.getpid()}}\\n')\n")
    (tmp_path / "main.py").write_text(
        "import os\nimport probe_mod\nfrom inflora_ray.data.loader import loader_context\n\n"
        "def child(q):\n    q.put(os.getpid())\n\n"
        "if __name__ == '__main__':\n    ctx = loader_context()\n    q = ctx.Queue()\n"
        "    p = ctx.Process(target=child, args=(q,))\n    p.start()\n    print(q.get())\n    p.join()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run([sys.executable, str(tmp_path / "main.py")], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    child = out.stdout.split()[-1]
    importers = log.read_text().split()
    assert len(importers) == 2 and child not in importers, (child, importers)  # the main script, the fork server
