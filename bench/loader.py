"""Data loading throughput at 224 px: decode + augment samples/s per CPU core, from the raw ImageNet-R folder
layout and from Parquet shards prepared from it (``python -m inflora_ray.data prepare``).

    python bench/loader.py --classes 20 --per-class 40 --workers 0 2

The dataset is generated (no download): JPEGs in ImageNet-R's layout and size range (300-600 px a side,
quality 90, smooth content plus noise so they compress and decode like photographs and renditions). With
``--root`` it reads a real ``imagenet-r/`` folder instead. ``--workers 0`` decodes in the main process on one
thread (samples/s per core); ``N > 0`` uses N DataLoader processes (samples/s of the whole loader). Each
figure is the best of ``--passes`` passes after a warm-up pass (page cache warm, as on a node after epoch 1).
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from common import machine
from inflora_ray.config import DataConfig
from inflora_ray.data import build_benchmark
from inflora_ray.data.loader import TaskDataset, make_loader, pass_batches, train_batches
from inflora_ray.data.shard_writer import prepare_shards


def synthetic_jpeg(rng: np.random.Generator, side: tuple[int, int] = (300, 600), cell: int = 32) -> bytes:
    """A photograph-like JPEG: a smooth random field (one random colour per ``cell`` px, upsampled) of
    ``side`` px a side (a range), plus mild noise."""
    w, h = (int(v) for v in rng.integers(side[0], side[1] + 1, size=2))
    coarse = rng.integers(0, 256, (h // cell + 1, w // cell + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_imagenet_r(root: str, classes: int, per_class: int, seed: int = 0,
                    side: tuple[int, int] = (300, 600)) -> int:
    """Write ``classes`` wnid folders of ``per_class`` JPEGs of ``side`` px a side (a range); return the total
    bytes written."""
    rng = np.random.default_rng(seed)
    total = 0
    for c in range(classes):
        folder = os.path.join(root, f"n{c:08d}")
        os.makedirs(folder)
        for k in range(per_class):
            data = synthetic_jpeg(rng, side, cell=max(2, min(32, side[0] // 8)))
            with open(os.path.join(folder, f"art_{k}.jpg"), "wb") as f:
                f.write(data)
            total += len(data)
    return total


def samples_per_second(dataset: TaskDataset, batches: list, workers: int, passes: int) -> float:
    """Best samples/s over ``passes`` full passes of the loader, after one warm-up pass."""
    n = sum(len(b) for b in batches)
    best = 0.0
    for p in range(passes + 1):
        t0 = time.perf_counter()
        for _ in make_loader(dataset, batches, loader_workers=workers):
            pass
        if p > 0:  # pass 0 warms the page cache and the shard reader
            best = max(best, n / (time.perf_counter() - t0))
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", help="a real imagenet-r/ folder (default: generate one)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--passes", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)  # one core per decoding process
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, "imagenet-r")
            size = make_imagenet_r(root, args.classes, args.per_class)
            print(f"# generated {args.classes * args.per_class} JPEGs, {size / 2**20:.1f} MiB, in ImageNet-R's layout")
        num_tasks = 2
        shards = os.path.join(tmp, "shards")
        t0 = time.perf_counter()
        prepare_shards("imagenet-r", root, shards, num_tasks=num_tasks)
        print(f"# prepared Parquet shards in {time.perf_counter() - t0:.1f} s")
        print(f"# loader throughput at {args.img_size} px, batch {args.batch}, on {machine()}")
        print(f"{'source':>8} {'workers':>7} {'train (decode+RRC+flip)':>24} {'test (decode+resize+crop)':>26}")
        for name, cfg in (("folder", DataConfig(benchmark="imagenet-r", root=root, num_tasks=num_tasks)),
                          ("parquet", DataConfig(benchmark="imagenet-r", shards=shards, num_tasks=num_tasks))):
            bm = build_benchmark(cfg, args.img_size)
            train = TaskDataset(bm.train, bm.preprocess, bm.label_map())
            test = TaskDataset(bm.test, bm.preprocess, bm.label_map())
            train_b = train_batches(np.arange(len(train)), args.batch, seed=0, task=0, epoch=0)
            test_b = pass_batches(np.arange(len(test)), args.batch)
            for w in args.workers:
                tr = samples_per_second(train, train_b, w, args.passes)
                te = samples_per_second(test, test_b, w, args.passes)
                unit = "per core" if w == 0 else f"{w} procs"
                print(f"{name:>8} {w:>7} {tr:>14.0f} samples/s {te:>16.0f} samples/s   ({unit})")


if __name__ == "__main__":
    main()
