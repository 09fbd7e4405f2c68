"""Every GPU figure in one command (under 10 minutes on one H100), written as JSON and a Markdown table.

    python bench/gpu.py                    # on a machine with a CUDA GPU: figures into gpu-figures/
    python bench/gpu.py --dry-run          # anywhere: what it would run (also what it does without a GPU)

On one GPU (the first visible one), at ViT-B/16 224 px, rank 10, in the precision ``train.precision: auto``
gives there (bf16, or fp16 on GPUs without native bf16):

1. training step: images/s of ours (finished tasks merged into W) and of the naive dense-sum variant
   (``bench/common.py``) at tasks 1, 10 and 20; TFLOP/s with attention counted (``bench/flops.py``), the
   fraction of the GPU's dense peak (table below), the allocator's peak memory;
2. ``torch.compile`` on and off (ours, task 1);
3. covariance pass (full fp32) and evaluation (tasks 1 and 10) images/s;
4. the device input pipeline (``data.pipeline: device``) on generated ImageNet-R-like JPEGs: images/s and
   host CPU-ms per image after the first pass of a task (decode on the GPU in the first pass), and how far
   its views are from the CPU path's on this GPU;
5. the quickstart end to end on one GPU through Ray Train with NCCL
   (``python -m inflora_ray.run --config quickstart --use-gpu``), its final accuracy and wall time.

Each part is timed and its errors recorded in the output instead of stopping the others.

Dense peaks (without sparsity) from NVIDIA's data sheets, bf16 tensor-core TFLOP/s: H100 SXM and H200 SXM
989.4, H100 NVL and H200 NVL 835, H100 PCIe 756, A100 312, L40S 362, A10 125, L4 121. V100 and T4 have no
native bf16: their fp16 tensor-core peaks are used instead (V100 SXM2 125, T4 65), as training runs in fp16
there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build, machine, timeit  # noqa: E402
from flops import step_flops  # noqa: E402

# (substring of torch.cuda.get_device_name, precision) -> dense peak TFLOP/s; first match wins.
PEAKS: list[tuple[str, str, float]] = [
    ("H100 NVL", "bf16", 835.0), ("H100 PCIe", "bf16", 756.0), ("H100", "bf16", 989.4),
    ("H200 NVL", "bf16", 835.0), ("H200", "bf16", 989.4), ("A100", "bf16", 312.0), ("L40S", "bf16", 362.0),
    ("L4", "bf16", 121.0), ("A10", "bf16", 125.0), ("V100", "fp16", 125.0), ("T4", "fp16", 65.0),
]
TASKS = (1, 10, 20)
MODEL, SIZE = "vit-b16", 224
QUICKSTART = [sys.executable, "-m", "inflora_ray.run", "--config", "quickstart", "--use-gpu", "--no-tracking"]


def peak_tflops(gpu_name: str, precision: str) -> Optional[float]:
    """The dense tensor-core peak of ``gpu_name`` in ``precision`` (bf16/fp16), None when not in the table."""
    for key, prec, value in PEAKS:
        if key in gpu_name and prec == precision:
            return value
    return None


def plan(args) -> list[str]:
    """What the command measures, one line per part."""
    return [
        f"training step: ViT-B/16 224 px, batch {args.batch}, rank 10, tasks {'/'.join(map(str, TASKS))}, ours vs "
        f"naive dense sum, {args.repeats} interleaved rounds: images/s, TFLOP/s (attention included), "
        "fraction of the dense peak, peak memory",
        "torch.compile on/off: ours at task 1",
        f"covariance pass: {args.cov_images} images, full fp32: images/s",
        "evaluation: tasks 1 and 10, batch 256: images/s",
        f"input pipeline: data.pipeline=device on {args.pipeline_images} generated JPEGs: images/s and host "
        "CPU-ms per image after the first pass (GPU JPEG decode in the first), view difference vs the CPU path",
        "quickstart end to end on 1 GPU (NCCL): " + " ".join(QUICKSTART[1:]) + " --storage-path TMP --name NAME",
    ]


def _timed(part: str, fn: Callable[[], dict], out: dict) -> None:
    """Run one part, recording its figures, its seconds, or its error."""
    t0 = time.perf_counter()
    try:
        out[part] = fn()
    except Exception as e:  # one failing part must not lose the others' figures
        out[part] = {"error": f"{type(e).__name__}: {e}"}
    out[part]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"# {part}: {json.dumps(out[part])}", flush=True)


def training(device, precision, batch: int, repeats: int) -> dict:
    """Part 1: ours vs naive at each task, interleaved rounds (as bench/step_cost.py)."""
    from step_cost import step_fn

    peak = peak_tflops(torch.cuda.get_device_name(device), precision.name)
    steps, flops, memory = {}, {}, {}
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, SIZE, SIZE, generator=g).to(device)
    targets = torch.randint(0, 10, (batch,), generator=g).to(device)
    for t in TASKS:
        for variant in ("ours", "naive"):
            model, trainable = build(MODEL, variant, t, 10, device)
            fn = step_fn(model, trainable, images, targets, precision.autocast)
            torch.cuda.reset_peak_memory_stats(device)
            timeit(fn, device, warmup=3, repeats=1)
            memory[(t, variant)] = torch.cuda.max_memory_allocated(device) / 2**20
            flops[(t, variant)] = step_flops(fn, model.backbone, batch)[1]
            steps[(t, variant)] = fn
    samples = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            samples[k].append(timeit(fn, device, warmup=0, repeats=1))
    rows = []
    for (t, variant), times in samples.items():
        sec = sorted(times)[len(times) // 2]
        tflops = flops[(t, variant)] / sec / 1e12
        rows.append({"task": t, "variant": variant, "ms_per_step": 1000 * sec, "images_per_s": batch / sec,
                     "gflop_per_step": flops[(t, variant)] / 1e9, "tflops": tflops,
                     "fraction_of_peak": None if peak is None else tflops / peak,
                     "peak_memory_mib": memory[(t, variant)]})
    ms = {(r["task"], r["variant"]): r["ms_per_step"] for r in rows}
    return {"precision": precision.name, "batch": batch, "peak_tflops": peak, "rows": rows,
            "naive_over_ours_task10": ms[(10, "naive")] / ms[(10, "ours")],
            "ours_task20_over_task1": ms[(20, "ours")] / ms[(1, "ours")]}


def compiled(device, precision, batch: int, repeats: int) -> dict:
    """Part 2: the training step of ours at task 1 with and without torch.compile on the forward."""
    out = {}
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, SIZE, SIZE, generator=g).to(device)
    targets = torch.randint(0, 10, (batch,), generator=g).to(device)
    for on in (False, True):
        model, trainable = build(MODEL, "ours", 1, 10, device)
        opt = torch.optim.Adam(trainable, lr=1e-4)
        forward = lambda x, model=model: model.heads[-1](model.features(x))  # noqa: E731
        if on:
            forward = torch.compile(forward)

        def step(forward=forward, opt=opt):
            with precision.autocast():
                logits = forward(images)
            loss = F.cross_entropy(logits.float(), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        sec = timeit(step, device, warmup=2, repeats=repeats)
        out["compile" if on else "eager"] = {"images_per_s": batch / sec, "ms_per_step": 1000 * sec,
                                             "first_step_s": first}
    out["speedup"] = out["eager"]["ms_per_step"] / out["compile"]["ms_per_step"]
    return out


def covariance_and_evaluation(device, precision, images: int) -> dict:
    """Part 3: the covariance pass (full fp32, as the loop runs it) and evaluation images/s."""
    from inflora_ray.core.subspace import covariance_sums

    model, _ = build(MODEL, "ours", 1, 10, device)
    batches = [torch.rand(min(128, images - b), 3, SIZE, SIZE).to(device) for b in range(0, images, 128)]
    run = lambda: covariance_sums(model, model.adapters, batches, forward=model.features)  # noqa: E731
    run()
    sec = timeit(run, device, warmup=0, repeats=3)
    out = {"covariance_images_per_s": images / sec}
    for t in (1, 10):
        model, _ = build(MODEL, "ours", t, 10, device)
        x = torch.rand(256, 3, SIZE, SIZE).to(device)

        def evaluate(model=model, x=x):
            with torch.no_grad(), precision.autocast():
                model(x).argmax(1)
        out[f"evaluation_images_per_s_task{t}"] = 256 / timeit(evaluate, device, warmup=2, repeats=5)
    return out


def input_pipeline(device, images: int, workers: int) -> dict:
    """Part 4: the device pipeline on generated JPEGs (ImageNet-R's layout and sizes), after the first pass."""
    from device_pipeline import cpu_ms_per_image, view_difference
    from loader import make_imagenet_r
    from inflora_ray.config import DataConfig
    from inflora_ray.data import build_benchmark
    from inflora_ray.data.device_pipeline import DevicePipeline
    from inflora_ray.data.loader import TaskDataset, train_batches

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "imagenet-r")
        make_imagenet_r(root, 20, max(1, images // 20))
        bm = build_benchmark(DataConfig(benchmark="imagenet-r", root=root, num_tasks=1), 224)
        train = TaskDataset(bm.train, bm.preprocess, bm.label_map())
        idx = bm.task_indices("train", 0)
        epoch = lambda e: train_batches(idx, 128, seed=0, task=0, epoch=e)  # noqa: E731
        pipe = DevicePipeline(train, device, cache_bytes=16 << 30, loader_workers=workers)
        t0 = time.perf_counter()
        first_ms = cpu_ms_per_image([lambda: pipe.loader(epoch(0))])
        torch.cuda.synchronize(device)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        later_ms = cpu_ms_per_image([lambda e=e: pipe.loader(epoch(e)) for e in (1, 2, 3)])
        torch.cuda.synchronize(device)
        later_s = time.perf_counter() - t0
        mean, mx = view_difference(DevicePipeline(train, device, cache_bytes=16 << 30, loader_workers=workers),
                                   train, epoch(1))
        return {"images": len(idx), "gpu_jpeg_decode": pipe.gpu_decode,
                "first_pass_images_per_s": len(idx) / first_s, "first_pass_cpu_ms_per_image": first_ms,
                "later_images_per_s": 3 * len(idx) / later_s, "later_cpu_ms_per_image": later_ms,
                "view_difference_vs_cpu_path_mean": mean, "view_difference_vs_cpu_path_max": mx}


def quickstart(timeout: int) -> dict:
    """Part 5: the quickstart through Ray Train on one GPU (NCCL), as a user runs it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = QUICKSTART + ["--storage-path", tmp, "--name", "gpu-quickstart"]
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=repo, env=env)
        seconds = time.perf_counter() - t0
        metrics_path = os.path.join(tmp, "gpu-quickstart", "results", "metrics.json")
        if proc.returncode != 0 or not os.path.exists(metrics_path):
            return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}", "command": " ".join(cmd[1:])}
        with open(metrics_path) as f:
            m = json.load(f)
        return {"command": " ".join(cmd[1:]), "wall_s": seconds, "final_accuracy": m["final_accuracy"],
                "average_incremental_accuracy": m["average_incremental_accuracy"],
                "forgetting": m["forgetting"], "status": m["status"]}


def markdown(res: dict) -> str:
    """The Markdown table of the figures in ``res``."""
    lines = [f"GPU figures on {res['machine']} (`python bench/gpu.py`), ViT-B/16 224 px, rank 10.", ""]
    tr = res.get("training", {})
    if "rows" in tr:
        lines += [f"Training step, batch {tr['batch']}, {tr['precision']} (dense peak: "
                  f"{tr['peak_tflops'] or 'not in the table'} TFLOP/s):", "",
                  "| task | variant | ms/step | images/s | GFLOP/step | TFLOP/s | of peak | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            frac = "" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.1%}"
            lines.append(f"| {r['task']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | "
                         f"{r['gflop_per_step']:.1f} | {r['tflops']:.1f} | {frac} | {r['peak_memory_mib']:.0f} |")
        lines += ["", f"naive / ours at task 10: {tr['naive_over_ours_task10']:.2f}x; ours task 20 / task 1: "
                      f"{tr['ours_task20_over_task1']:.3f}", ""]
    rows = []
    c = res.get("compile", {})
    if "speedup" in c:
        rows.append(("torch.compile, ours task 1: images/s eager / compiled",
                     f"{c['eager']['images_per_s']:.0f} / {c['compile']['images_per_s']:.0f} "
                     f"({c['speedup']:.2f}x; first compiled step {c['compile']['first_step_s']:.0f} s)"))
    ce = res.get("covariance_and_evaluation", {})
    if "covariance_images_per_s" in ce:
        rows.append(("covariance pass (fp32), images/s", f"{ce['covariance_images_per_s']:.0f}"))
        rows.append(("evaluation images/s, task 1 / task 10", f"{ce['evaluation_images_per_s_task1']:.0f} / "
                                                             f"{ce['evaluation_images_per_s_task10']:.0f}"))
    ip = res.get("input_pipeline", {})
    if "later_images_per_s" in ip:
        rows.append(("input pipeline (device), images/s after the first pass",
                     f"{ip['later_images_per_s']:.0f} ({ip['later_cpu_ms_per_image']:.3f} host CPU-ms/image)"))
        rows.append(("input pipeline, first pass (decode into the cache)",
                     f"{ip['first_pass_images_per_s']:.0f} images/s ({ip['first_pass_cpu_ms_per_image']:.3f} "
                     f"host CPU-ms/image, GPU JPEG decode: {ip['gpu_jpeg_decode']})"))
        rows.append(("input pipeline, views vs the CPU path (pixels in [0, 1])",
                     f"mean {ip['view_difference_vs_cpu_path_mean']:.3g}, max "
                     f"{ip['view_difference_vs_cpu_path_max']:.3g}"))
    q = res.get("quickstart", {})
    if "final_accuracy" in q:
        rows.append(("quickstart on 1 GPU (NCCL), final / average incremental accuracy (pooled)",
                     f"{q['final_accuracy']:.3f} / {q['average_incremental_accuracy']:.3f} in {q['wall_s']:.0f} s"))
    lines += ["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    errors = [f"- {part}: {v['error']}" for part, v in res.items() if isinstance(v, dict) and "error" in v]
    return "\n".join(lines + (["", "Errors:"] + errors if errors else [])) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-figures", help="folder for gpu.json and gpu.md")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cov-images", type=int, default=1024)
    p.add_argument("--pipeline-images", type=int, default=1600)
    p.add_argument("--loader-workers", type=int, default=4)
    p.add_argument("--quickstart-timeout", type=int, default=300)
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    args = p.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        why = "--dry-run" if args.dry_run else "no CUDA GPU on this machine"
        print(f"# {why}: nothing measured. On a machine with a CUDA GPU, `python bench/gpu.py` would take, "
              f"into {args.out}/gpu.json and {args.out}/gpu.md:")
        for i, line in enumerate(plan(args), 1):
            print(f"{i}. {line}")
        return 0
    from inflora_ray.training.precision import Precision

    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True  # as the training loop sets it on a GPU
    torch.backends.cudnn.allow_tf32 = True
    precision = Precision.for_device("auto", device)
    res: dict = {"machine": machine(), "torch": torch.__version__, "plan": plan(args)}
    t0 = time.perf_counter()
    _timed("training", lambda: training(device, precision, args.batch, args.repeats), res)
    _timed("compile", lambda: compiled(device, precision, args.batch, max(5, args.repeats // 2)), res)
    _timed("covariance_and_evaluation", lambda: covariance_and_evaluation(device, precision, args.cov_images), res)
    _timed("input_pipeline", lambda: input_pipeline(device, args.pipeline_images, args.loader_workers), res)
    torch.cuda.empty_cache()
    _timed("quickstart", lambda: quickstart(args.quickstart_timeout), res)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    table = markdown(res)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
