"""Training-step cost at task 1 and task T: ours (finished tasks merged into W, current task in low rank)
vs the naive approach (dense sum of every task's B_s A_s rebuilt at each forward).

    python bench/step_cost.py --model quickstart --tasks 1 10 20
    python bench/step_cost.py --model quickstart --tasks 1 10 --methods ours sd-lora joint
    python bench/step_cost.py --model vit-b16 --batch 128 --tasks 1 10 20 --device cuda --bf16 --peak-tflops 989

saved_MiB: bytes of the tensors autograd keeps for the backward pass during one step (the activation
memory, device-independent; the naive approach also keeps its dense deltas); peak_MiB: the CUDA allocator's
peak (GPU only). GFLOP_counted: one training step (forward + backward) as torch's FlopCounterMode counts it
(matmuls, convolutions, and attention only where it runs a GPU kernel); GFLOP: the same with attention
counted in closed form on every device (``flops.py``: 12 B N^2 D per block). Achieved TFLOP/s is GFLOP
divided by the measured step time; ``--peak-tflops`` (989 for an H100 SXM's dense bf16) adds the fraction of
peak.

``--methods`` picks the variants: ``ours`` (InfLoRA: finished tasks merged), ``naive``, or any other method
name (``seq-lora``, ``sd-lora``, ``joint``, ...), built at task T through the method's own hooks with T-1
finished tasks; its step is the method's training forward (its features, its trained heads, its auxiliary
loss) and its trainable parameters.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F

from common import build_variant, machine, timeit
from flops import step_flops


def step_fn(forward, trainable, images, targets, autocast):
    opt = torch.optim.Adam(trainable, lr=1e-4)

    def step():
        with autocast():
            out = forward(images)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss = F.cross_entropy(logits.float(), targets)
        if aux is not None:
            loss = loss + aux.float() / len(targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward during one call of ``fn``."""
    storages = {}

    def pack(t):
        if t.device.type != "meta":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="quickstart", choices=("quickstart", "vit-b16"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 20])
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--methods", nargs="+", default=["ours", "naive"],
                   help="ours (InfLoRA), naive, or method names (sd-lora, joint, ...)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, to print the fraction")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.bf16
                else contextlib.nullcontext)
    print(f"# step cost, model={args.model} batch={args.batch} rank={args.rank} bf16={args.bf16} on {machine()}")
    print(f"# {args.repeats} interleaved rounds (every model steps once per round), median per model")
    steps, backbones, peaks, flops, counted, saved = {}, {}, {}, {}, {}, {}
    for t in args.tasks:
        for variant in args.methods:
            model, trainable, forward = build_variant(args.model, variant, t, args.rank, device)
            size = model.backbone.patch_embed.img_size[0]
            g = torch.Generator().manual_seed(0)
            images = torch.rand(args.batch, 3, size, size, generator=g).to(device)
            targets = torch.randint(0, 10, (args.batch,), generator=g).to(device)
            steps[(t, variant)] = step_fn(forward, trainable, images, targets, autocast)
            backbones[(t, variant)] = model.backbone
    for key, fn in steps.items():  # warm-up, and peak memory of one step per model
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timeit(fn, device, warmup=2, repeats=1)
        peaks[key] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        counted[key], flops[key] = step_flops(fn, backbones[key], args.batch)
        saved[key] = saved_bytes(fn) / 2**20
    samples = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, fn in steps.items():
            samples[key].append(timeit(fn, device, warmup=0, repeats=1))
    results = {key: statistics.median(v) for key, v in samples.items()}
    print(f"{'tasks':>5} {'variant':>12} {'step_ms':>9} {'img/s':>9} {'saved_MiB':>9} {'peak_MiB':>9} "
          f"{'GFLOP_counted':>13} {'GFLOP':>8} {'TFLOP/s':>8}"
          + (f" {'of_peak':>7}" if args.peak_tflops else ""))
    for (t, variant), sec in results.items():
        tflops = flops[(t, variant)] / sec / 1e12
        print(f"{t:>5} {variant:>12} {1000 * sec:>9.1f} {args.batch / sec:>9.1f} {saved[(t, variant)]:>9.1f} "
              f"{peaks[(t, variant)]:>9.0f} {counted[(t, variant)] / 1e9:>13.1f} "
              f"{flops[(t, variant)] / 1e9:>8.1f} {tflops:>8.3f}"
              + (f" {tflops / args.peak_tflops:>7.1%}" if args.peak_tflops else ""))
    first = min(args.tasks)
    for t in args.tasks:
        for variant in args.methods:
            if variant not in ("ours", "naive") and "ours" in args.methods:
                print(f"task {t:>3}: {variant}/ours = {results[(t, variant)] / results[(t, 'ours')]:.2f}x   "
                      f"{variant} task {t}/task {first} = {results[(t, variant)] / results[(first, variant)]:.3f}")
    for t in args.tasks if {"ours", "naive"} <= set(args.methods) else []:
        print(f"task {t:>3}: naive/ours = {results[(t, 'naive')] / results[(t, 'ours')]:.2f}x   "
              f"ours task {t}/task {first} = {results[(t, 'ours')] / results[(first, 'ours')]:.3f}   "
              f"naive task {t}/task {first} = {results[(t, 'naive')] / results[(first, 'naive')]:.3f}")

if __name__ == "__main__":
    main()
