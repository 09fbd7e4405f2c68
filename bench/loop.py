"""The real training loop's images/s beside the benchmark's step rate, on generated ImageNet-R-like data.

    python bench/loop.py                  # on a CUDA GPU: ViT-B/16 at 224 px through Ray Train, 1 GPU
    python bench/loop.py --cpu --tiny     # anywhere, in well under a minute: the same path, tiny ViT at 16 px

1. Writes JPEGs in ImageNet-R's folder layout and size range (``bench/loader.py``: 300-600 px a side;
   ``--tiny``: 20-40 px) into a temporary folder.
2. Times the benchmark's step (:class:`common.BenchStep`: the loop's own ``train_step`` on the loop's own
   forward module, current head, the loop's optimizer and precision) on the same model, batch, rank and
   head size as the run, at the task the run is read at, alone on the device; then frees it.
3. Runs the training loop as a user runs it, through Ray Train with one worker (one GPU, NCCL, unless
   ``--cpu``): ``python -m inflora_ray.run --config imagenet-r-10`` on that folder with ``data.pipeline=device``,
   random weights (speed does not depend on them; no download), no tracking.
4. Reads the run's own images/s from its ``results/metrics.json`` (per task: the task's training images over
   its training seconds, every epoch of the task included; the covariance passes and evaluation are not
   training time) and prints it beside the step's images/s and their ratio, for the last task (the first
   also pays CUDA's and the kernels' start-up). The goal on a GPU: the loop within 10% of the step.

The training settings are the ``imagenet-r-10`` preset's (Adam, bf16 autocast on a GPU through
``train.precision: auto``, deterministic algorithms as ``train.deterministic`` asks), set the same way for
the step (:func:`common.loop_backend`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BenchStep, loop_backend, machine, measure_alone, model_config, throughput,  # noqa: E402
                    train_config)
from loader import make_imagenet_r  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "imagenet-r-10"
# (model, image side range, classes, images per class, tasks, epochs, batch): a GPU-sized run, and a tiny one.
# 20 classes x 80 images in 2 tasks: 640 training images per task (80% of each class), 5 full batches of 128.
SIZES = {
    "gpu": dict(model="vit-b16", side=(300, 600), classes=20, per_class=80, tasks=2, epochs=10, batch=128),
    "tiny": dict(model="tiny", side=(20, 40), classes=4, per_class=10, tasks=2, epochs=2, batch=8),
}


def run_command(root: str, storage: str, size: dict, rank: int, cpu: bool, loader_workers: int) -> list[str]:
    """The ``python -m inflora_ray.run`` command line of the measured run."""
    m = model_config(size["model"])
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in m.kwargs.items()) + "}"
    overrides = {
        "data.root": root, "data.num_tasks": size["tasks"], "data.batch_size": size["batch"],
        "data.pipeline": "device", "data.loader_workers": loader_workers, "train.epochs": size["epochs"],
        "train.compile": "false", "model.name": m.name, "model.img_size": m.img_size, "model.kwargs": kwargs,
        "model.pretrained": "false", "model.weights_file": "null", "method.rank": rank,
        "run.num_workers": 1, "run.cpus_per_worker": max(1, loader_workers),
        "experiment.log_every_steps": 1000,
    }
    if cpu:
        overrides.update({"run.use_gpu": "false", "train.device": "cpu"})
    else:
        overrides.update({"run.use_gpu": "true", "run.gpus_per_worker": 1})
    return [sys.executable, "-m", "inflora_ray.run", "--config", PRESET,
            *[f"{k}={v}" for k, v in overrides.items()],
            "--storage-path", storage, "--name", "loop", "--no-tracking"]


def step_rate(size: dict, rank: int, task: int, device: torch.device, repeats: int) -> dict:
    """images/s of the benchmark's step at task ``task`` (1-based) with the run's model, batch and head size."""
    from inflora_ray.training.precision import Precision

    precision = Precision.for_device(train_config().precision, device)
    side = model_config(size["model"]).img_size
    classes = size["classes"] // size["tasks"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(size["batch"], 3, side, side, generator=g).to(device)
    targets = torch.randint(0, classes, (size["batch"],), generator=g).to(device)
    build = lambda _: BenchStep(size["model"], "ours", task, rank, device, precision, images, targets,  # noqa: E731
                                classes_per_task=classes)
    sec = measure_alone(["ours"], build, lambda _, step: throughput(step, device, steps=repeats),
                        device)["ours"]
    return {"precision": precision.name, "ms_per_step": 1000 * sec, "images_per_s": size["batch"] / sec}


def measure(size: dict, cpu: bool, loader_workers: int, repeats: int, timeout: int) -> dict:
    """The figures of the module docstring: the step's and the loop's images/s, and their ratio."""
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    train = train_config()
    loop_backend(device, train)
    rank = 10
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "imagenet-r")
        t0 = time.perf_counter()
        make_imagenet_r(root, size["classes"], size["per_class"], side=size["side"])
        generated = time.perf_counter() - t0
        step = step_rate(size, rank, size["tasks"], device, repeats)
        cmd = run_command(root, os.path.join(tmp, "runs"), size, rank, cpu, loader_workers)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        wall = time.perf_counter() - t0
        shown = " ".join(cmd[1:]).replace(root, "ROOT").replace(os.path.join(tmp, "runs"), "RUNS")
        metrics_path = os.path.join(tmp, "runs", "loop", "results", "metrics.json")
        if proc.returncode != 0 or not os.path.exists(metrics_path):
            return {"error": f"exit {proc.returncode}: {proc.stderr[-3000:]}", "command": shown, "step": step}
        with open(metrics_path) as f:
            tasks = json.load(f)["tasks"]
    per_task = [{"task": t["task"], "images_per_s": t["images_per_second"], "train_images": t["train_images"],
                 "train_seconds": t["train_seconds"], "peak_memory_mb": t["peak_memory_mb"]} for t in tasks]
    loop = per_task[-1]["images_per_s"]
    return {"device": machine(), "command": shown, "images": size["classes"] * size["per_class"],
            "generate_seconds": round(generated, 1), "run_wall_seconds": round(wall, 1), "batch": size["batch"],
            "epochs": size["epochs"], "step": step, "loop_tasks": per_task, "loop_images_per_s": loop,
            "loop_over_step": loop / step["images_per_s"], "within_10_percent": loop >= 0.9 * step["images_per_s"]}


def summary_lines(r: dict) -> list[str]:
    """Human-readable lines of :func:`measure`'s result."""
    if "error" in r:
        return [f"# loop run failed: {r['error']}", f"# command: {r['command']}"]
    tasks = ", ".join(f"task {t['task']} {t['images_per_s']:.0f}" for t in r["loop_tasks"])
    return [f"# {r['device']}; {r['images']} generated images, batch {r['batch']}, {r['epochs']} epochs per task",
            f"# run: {r['command']}",
            f"step (bench, {r['step']['precision']}): {r['step']['images_per_s']:.1f} images/s "
            f"({r['step']['ms_per_step']:.1f} ms/step)",
            f"loop (run's metrics.json, last task): {r['loop_images_per_s']:.1f} images/s   [{tasks}]",
            f"loop / step: {r['loop_over_step']:.3f}   (goal on a GPU: >= 0.9; "
            f"{'met' if r['within_10_percent'] else 'not met'})"]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (Ray Train worker without a GPU)")
    p.add_argument("--tiny", action="store_true", help="tiny ViT at 16 px on a small generated set")
    p.add_argument("--epochs", type=int, help="epochs per task (default: 10, --tiny 2)")
    p.add_argument("--loader-workers", type=int, default=4, help="data.loader_workers (first pass decode)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps of the bench's step")
    p.add_argument("--timeout", type=int, default=420, help="seconds the run may take")
    p.add_argument("--out", help="also write the figures to this JSON file")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    size = dict(SIZES["tiny" if args.tiny else "gpu"])
    if args.epochs:
        size["epochs"] = args.epochs
    workers = 0 if args.tiny else args.loader_workers
    if args.dry_run or not (args.cpu or torch.cuda.is_available()):
        why = "--dry-run" if args.dry_run else "no CUDA GPU on this machine (--cpu runs it on the CPU)"
        cmd = run_command("ROOT", "RUNS", size, 10, args.cpu, workers)
        print(f"# {why}: nothing measured. It would generate {size['classes'] * size['per_class']} JPEGs in "
              f"ROOT, time the bench's step, then run:\n{' '.join(cmd[1:])}")
        return 0
    r = measure(size, args.cpu, workers, args.repeats, args.timeout)
    for line in summary_lines(r):
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
    return 1 if "error" in r else 0


if __name__ == "__main__":
    sys.exit(main())
