"""Data-parallel scaling on this machine: quickstart training throughput with 1 worker x T threads vs
N workers x T threads (Ray Train, gloo), and the bytes all-reduced per step.

    python bench/scaling.py --workers 1 2 --threads 1
"""
from __future__ import annotations

import argparse
import tempfile

from common import machine
from inflora_ray.presets import load_config
from inflora_ray.core.model import build_model
from inflora_ray.ray_train.launch import RunContext, RunOptions, run_experiment


def synced_bytes(cfg) -> int:
    """fp32 gradient bytes all-reduced per step: the current task's B_k, B_v of every block and its head."""
    model = build_model(cfg.model, cfg.method.rank)
    adapters = sum(l.lora_B_k.numel() + l.lora_B_v.numel() for l in model.adapters)
    head = model.embed_dim * 2 + 2  # a 2-class head of the quickstart
    return 4 * (adapters + head)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) per worker")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = ["tracking.enabled=false", f"data.num_tasks={args.tasks}", f"train.epochs={args.epochs}",
            f"run.cpus_per_worker={args.threads}", *args.overrides]
    print(f"# scaling, quickstart, {args.threads} thread(s) per worker, on {machine()}")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            cfg = load_config("quickstart", base + [f"run.num_workers={n}", f"run.storage_path={tmp}"])
            res = run_experiment(cfg, RunOptions(name=f"scaling-{n}"), RunContext(quiet_table=True))
            # training images per second over all tasks (covariance passes and evaluation excluded)
            imgs = sum(t["result"]["train_images"] for t in res.tasks)
            secs = sum(t["result"]["train_seconds"] for t in res.tasks)
            rates[n] = imgs / secs
    one = rates.get(1)
    print(f"{'workers':>7} {'img/s':>9} {'efficiency':>10}")
    for n, r in rates.items():
        eff = r / (n * one) if one else float("nan")
        print(f"{n:>7} {r:>9.1f} {eff:>10.2f}")
    cfg = load_config("quickstart")
    print(f"bytes all-reduced per step (fp32 grads of B_k, B_v and the head): {synced_bytes(cfg):,}")


if __name__ == "__main__":
    main()
