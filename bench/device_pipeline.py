"""Host CPU time per training image: the CPU input path against the device input path (``data.pipeline``).

    python bench/device_pipeline.py --classes 20 --per-class 40

ImageNet-R-like JPEGs are generated (as in ``bench/loader.py``: 300-600 px a side) and read from the folder
layout at 224 px. CPU time is the process's user + system time, DataLoader children included
(``resource.getrusage``), per training image of one pass over a task's training data:

- CPU path: decode + RandomResizedCrop + flip + float conversion in every epoch (``--workers`` processes);
- device path, first pass of a task: decode once into the uint8 cache (host decode: no GPU here);
- device path, later epochs, host work only: the pipeline run with its cache on PyTorch's ``meta`` device,
  which dispatches every operation as it would to a GPU but computes nothing, so what is left is the host's
  share (per-sample parameter draws, cache look-ups, operator dispatch, batching); a CUDA launch adds a few
  microseconds per operation on top (``bench/gpu.py`` measures the real figure on a GPU);
- device path, later epochs with the device work done on this CPU (what a CPU-only run would pay).

The device path's host work is measured both ways: views one image at a time (the CPU device's default) and
batched (a fixed number of calls per batch, the GPU's default; ``DevicePipeline(batched=...)``).

It also prints how far the device path's views are from the CPU path's: bitwise on a CPU device with the
default cache (per-image views), with a resized cache (``--cache-side``), and with batched views (against the
CPU path and against the per-image views, training and test views).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile

import torch

from common import machine
from loader import make_imagenet_r
from inflora_ray.config import DataConfig
from inflora_ray.data import build_benchmark
from inflora_ray.data.device_pipeline import DevicePipeline
from inflora_ray.data.loader import TaskDataset, make_loader, pass_batches, train_batches


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system seconds of the process and of its children it has waited for), from
    /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        # fields[0] is the state; ppid is field 4 of stat(5), utime..cstime fields 14-17
        out[int(entry)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / tick)
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of every process below it: its DataLoader processes,
    which are children of the loader's fork server rather than of this process (so ``RUSAGE_CHILDREN`` misses
    them), whether they still run or have ended (an ended process's time is in its parent's children's
    figures). Without /proc, this process and its own ended children only."""
    if not os.path.isdir("/proc/self"):
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    stats = _proc_stats()
    total, frontier = 0.0, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        total += stats.get(pid, (0, 0.0))[1]
        frontier += [child for child, (parent, _) in stats.items() if parent == pid]
    return total


def cpu_ms_per_image(passes) -> float:
    """CPU-ms per image of iterating each loader given by the ``passes`` callables (images counted)."""
    n, t0 = 0, cpu_seconds()
    for make in passes:
        for images, _ in make():
            n += len(images)
    return 1000 * (cpu_seconds() - t0) / max(n, 1)


def view_difference(pipe: DevicePipeline, dataset: TaskDataset, batches) -> tuple[float, float]:
    """(mean, max) absolute difference in [0, 1] pixel units between the device path's and the CPU path's
    views of the same batches."""
    diffs = [(a.cpu() - b).abs().flatten() for (a, _), (b, _) in zip(pipe.loader(batches), make_loader(dataset, batches))]
    d = torch.cat(diffs)
    return float(d.mean()), float(d.max())


def pipeline_difference(a: DevicePipeline, b: DevicePipeline, batches) -> tuple[float, float]:
    """(mean, max) absolute difference in [0, 1] pixel units between two device pipelines' views."""
    diffs = [(x.cpu() - y.cpu()).abs().flatten() for (x, _), (y, _) in zip(a.loader(batches), b.loader(batches))]
    d = torch.cat(diffs)
    return float(d.mean()), float(d.max())


def measure(root: str, img_size: int, batch: int, epochs: int, workers: list[int], cache_side: int) -> dict:
    """Every figure of the module docstring, for task 0 of a 2-task split of the folder at ``root``."""
    bm = build_benchmark(DataConfig(benchmark="imagenet-r", root=root, num_tasks=2), img_size)
    train = TaskDataset(bm.train, bm.preprocess, bm.label_map())
    idx = bm.task_indices("train", 0)
    epoch = lambda e: train_batches(idx, batch, seed=0, task=0, epoch=e)  # noqa: E731
    out = {"images_per_pass": len(idx), "batch": batch, "img_size": img_size}
    for w in workers:
        # Epoch 0 warms the page cache; the CPU path costs the same in every epoch after it.
        cpu_ms_per_image([lambda: make_loader(train, epoch(0), loader_workers=w)])
        out[f"cpu_path_{w}_procs"] = cpu_ms_per_image(
            [lambda e=e: make_loader(train, epoch(e), loader_workers=w) for e in range(1, epochs + 1)])
    for device in ("meta", "cpu"):
        for batched in (False, True):
            pipe = DevicePipeline(train, torch.device(device), cache_bytes=8 << 30, loader_workers=0, batched=batched)
            first = cpu_ms_per_image([lambda: pipe.loader(epoch(0))])
            later = cpu_ms_per_image([lambda e=e: pipe.loader(epoch(e)) for e in range(1, epochs + 1)])
            assert pipe.decoded == len(idx), "later epochs must read the cache only"
            way = "batched" if batched else "per_image"
            out[f"device_path_{device}_{way}_first_pass"] = first
            out[f"device_path_{device}_{way}_later_epochs"] = later
    check = epoch(1)
    exact = DevicePipeline(train, torch.device("cpu"), cache_bytes=8 << 30)
    out["difference_default_cache"] = view_difference(exact, train, check)
    resized = DevicePipeline(train, torch.device("cpu"), cache_bytes=8 << 30, cache_side=cache_side)
    out[f"difference_cache_side_{cache_side}"] = view_difference(resized, train, check)
    test = TaskDataset(bm.test, bm.preprocess, bm.label_map())
    test_batches = pass_batches(bm.task_indices("test", 0), batch)
    out[f"difference_cache_side_{cache_side}_test_view"] = view_difference(
        DevicePipeline(test, torch.device("cpu"), cache_bytes=8 << 30, cache_side=cache_side), test, test_batches)
    for data, batches, what in ((train, check, "train"), (test, test_batches, "test")):
        batched = DevicePipeline(data, torch.device("cpu"), cache_bytes=8 << 30, batched=True)
        out[f"difference_batched_{what}_view"] = view_difference(batched, data, batches)
        per_image = DevicePipeline(data, torch.device("cpu"), cache_bytes=8 << 30, batched=False)
        out[f"difference_batched_vs_per_image_{what}_view"] = pipeline_difference(batched, per_image, batches)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", help="a real imagenet-r/ folder (default: generate one)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="epochs after the first one to time")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--cache-side", type=int, default=256)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(1)  # per-core figures, as bench/loader.py
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, "imagenet-r")
            make_imagenet_r(root, args.classes, args.per_class)
        r = measure(root, args.img_size, args.batch, args.epochs, args.workers, args.cache_side)
    print(f"# host CPU-ms per training image, {r['images_per_pass']} images per pass, {args.img_size} px, "
          f"batch {args.batch}, on {machine()}")
    for w in args.workers:
        print(f"{'cpu path, every epoch (' + str(w) + ' loader procs)':<60} {r[f'cpu_path_{w}_procs']:7.3f}")
    print(f"{'device path, first pass of a task (decode into the cache)':<60} "
          f"{r['device_path_cpu_per_image_first_pass']:7.3f}")
    for way in ("per_image", "batched"):
        label = way.replace("_", "-") + " views"
        print(f"{'device path, later epochs, host work only (meta), ' + label:<60} "
              f"{r[f'device_path_meta_{way}_later_epochs']:7.3f}   (target <= 0.9)")
        print(f"{'device path, later epochs, device work on this CPU, ' + label:<60} "
              f"{r[f'device_path_cpu_{way}_later_epochs']:7.3f}")
    mean, mx = r["difference_default_cache"]
    print(f"# device path vs CPU path, default cache, CPU device: mean |diff| {mean:.3g}, max {mx:.3g} "
          f"(pixels in [0, 1])")
    for key in (f"difference_cache_side_{args.cache_side}", f"difference_cache_side_{args.cache_side}_test_view",
                "difference_batched_train_view", "difference_batched_test_view",
                "difference_batched_vs_per_image_train_view", "difference_batched_vs_per_image_test_view"):
        mean, mx = r[key]
        print(f"# {key.replace('difference_', '').replace('_', ' ')}: mean |diff| {mean:.3g}, max {mx:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), **r}, f, indent=1)


if __name__ == "__main__":
    main()
