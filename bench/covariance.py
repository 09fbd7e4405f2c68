"""Covariance pass, design of A_t and DualGPM update time per task; ours (fp32 sums on the device) vs the
naive pass (each batch's covariance copied to the host and summed there).

    python bench/covariance.py --model quickstart --images 512
"""
from __future__ import annotations

import argparse
import time

import torch

from common import build, machine
from inflora_ray.core.subspace import LayerMemory, covariance_sums, design_lora_A


def naive_pass(model, layers, batches):
    sums = [torch.zeros(l.in_features, l.in_features) for l in layers]
    counts = [0] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        def hook(_m, args, i=i):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[i] += (x.T @ x).cpu()  # a device -> host copy every batch, every layer
            counts[i] += x.shape[0]
        handles.append(layer.register_forward_pre_hook(hook))
    with torch.no_grad():
        for images in batches:
            model.features(images)
    for h in handles:
        h.remove()
    return sums, counts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="quickstart", choices=("quickstart", "vit-b16"))
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, _ = build(args.model, "ours", 1, args.rank, device)
    size = model.backbone.patch_embed.img_size[0]
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(min(args.batch, args.images - b), 3, size, size, generator=g).to(device)
               for b in range(0, args.images, args.batch)]
    print(f"# covariance / design / memory, model={args.model} images={args.images} on {machine()}")

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    timed(lambda: covariance_sums(model, model.adapters, batches[:1], forward=model.features))  # warm-up
    (sums, counts), t_ours = timed(lambda: covariance_sums(model, model.adapters, batches, forward=model.features))
    _, t_naive = timed(lambda: naive_pass(model, model.adapters, batches))
    covs = [s / counts[i] for i, s in enumerate(sums)]
    mems = [LayerMemory(dim=c.shape[0]) for c in covs]
    _, t_update1 = timed(lambda: [m.update(c, 0.95) for m, c in zip(mems, covs)])
    _, t_design = timed(lambda: [design_lora_A(c, m, args.rank) for m, c in zip(mems, covs)])
    _, t_update2 = timed(lambda: [m.update(c * 1.01, 0.97) for m, c in zip(mems, covs)])
    print(f"covariance pass, ours (device fp32 sums): {t_ours:.3f} s  ({args.images / t_ours:.0f} img/s)")
    print(f"covariance pass, naive (host copy/batch): {t_naive:.3f} s  ({args.images / t_naive:.0f} img/s)")
    print(f"design of A_t, {len(covs)} layers:           {t_design:.3f} s")
    print(f"memory update, first task:                {t_update1:.3f} s")
    print(f"memory update, later task:                {t_update2:.3f} s")


if __name__ == "__main__":
    main()
