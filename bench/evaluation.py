"""Evaluation throughput (class-incremental inference over all seen heads), at task 1 and task T.

    python bench/evaluation.py --model quickstart --tasks 1 10
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from common import build, machine, timeit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="quickstart", choices=("quickstart", "vit-b16"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 10])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext)
    print(f"# evaluation, model={args.model} batch={args.batch} on {machine()}")
    for t in args.tasks:
        model, _ = build(args.model, "ours", t, 10, device)
        size = model.backbone.patch_embed.img_size[0]
        images = torch.rand(args.batch, 3, size, size).to(device)

        def run():
            with torch.no_grad(), autocast():
                model(images).argmax(1)
        sec = timeit(run, device, warmup=1, repeats=3)
        print(f"task {t:>3}: {args.batch / sec:8.1f} img/s")


if __name__ == "__main__":
    main()
