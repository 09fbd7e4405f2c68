"""Every GPU figure in one command (under 10 minutes on one H100), written as JSON and a Markdown table.

    python bench/gpu.py                    # on a machine with a CUDA GPU: figures into gpu-figures/
    python bench/gpu.py --dry-run          # anywhere: what it would run (also what it does without a GPU)

On one GPU (the first visible one), at ViT-B/16 224 px, rank 10, in the precision ``train.precision: auto``
gives there (bf16, or fp16 on GPUs without native bf16), with the backend settings the training loop makes
(TF32, deterministic algorithms as the ImageNet-R presets' ``train.deterministic`` asks):

1. training step: the loop's own step (``common.BenchStep``: ``inflora_ray.training.step.train_step`` on the
   loop's forward module, the method's features and the current task's head only, the method's loss, the
   loop's optimizer, scaler and autocast) of ours (finished tasks merged into W) and of the naive dense-sum
   variant (``bench/common.py``) at tasks 1, 10 and 20, each built, measured and freed alone: images/s over
   back-to-back steps, TFLOP/s with attention counted (``bench/flops.py``), the fraction of the GPU's dense
   peak (``bench/peaks.py``: exact GPU names, None for a name not in the table), the allocator's peak
   memory with that variant alone on the GPU; with ``--profile`` (the default), a ``torch.profiler``
   summary of ours at task 1: the top kernels by GPU time and the shares of matmul, attention, elementwise,
   LayerNorm and other work (``bench/kernel_profile.py``);
2. ``torch.compile`` on and off (ours, task 1, the same step);
3. covariance pass (full fp32) and evaluation (tasks 1 and 10) images/s;
4. the device input pipeline (``data.pipeline: device``) on generated ImageNet-R-like JPEGs: images/s and
   host CPU-ms per image after the first pass of a task (decode on the GPU in the first pass), with batched
   views (the default on a GPU) and per-image views, and how far the views are from the CPU path's and from
   each other on this GPU;
5. the real training loop: ``python -m inflora_ray.run --config imagenet-r-10`` on generated ImageNet-R-like
   JPEGs at 224 px through Ray Train on the GPU, its images/s beside the step's (``bench/loop.py``);
6. the quickstart end to end on one GPU through Ray Train with NCCL
   (``python -m inflora_ray.run --config quickstart --use-gpu``), its final accuracy and wall time.

Each part is timed and its errors recorded in the output instead of stopping the others.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BenchStep, allocated_mib, build, free, loop_backend, machine, measure_alone,  # noqa: E402
                    peak_mib, throughput, timeit, train_config)
from flops import step_flops  # noqa: E402
from peaks import peak_for  # noqa: E402

TASKS = (1, 10, 20)
MODEL, SIZE, RANK = "vit-b16", 224, 10
QUICKSTART = [sys.executable, "-m", "inflora_ray.run", "--config", "quickstart", "--use-gpu", "--no-tracking"]


def plan(args) -> list[str]:
    """What the command measures, one line per part."""
    from loop import SIZES, run_command

    loop = " ".join(run_command("ROOT", "RUNS", SIZES["gpu"], RANK, False, args.loader_workers)[1:])
    return [
        f"training step (the loop's train_step, current head): ViT-B/16 224 px, batch {args.batch}, rank {RANK}, "
        f"tasks {'/'.join(map(str, TASKS))}, ours vs naive dense sum, each variant alone on the GPU, "
        f"{args.repeats} back-to-back steps: images/s, TFLOP/s (attention included), fraction of the dense "
        "peak (exact GPU name), peak memory of the variant alone"
        + ("; torch.profiler summary of ours at task 1 (top kernels, matmul/attention/elementwise/LayerNorm "
           "shares)" if args.profile else ""),
        "torch.compile on/off: ours at task 1, the same step",
        f"covariance pass: {args.cov_images} images, full fp32: images/s",
        "evaluation: tasks 1 and 10, batch 256: images/s",
        f"input pipeline: data.pipeline=device on {args.pipeline_images} generated JPEGs: images/s and host "
        "CPU-ms per image after the first pass (GPU JPEG decode in the first), batched and per-image views, "
        "view differences vs the CPU path and between the two",
        f"real training loop vs the step: {loop}",
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


def _inputs(device: torch.device, batch: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of images and labels on ``device`` (the step's cost does not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, SIZE, SIZE, generator=g).to(device)
    return images, torch.randint(0, classes, (batch,), generator=g).to(device)


def training(device, precision, batch: int, repeats: int, profile: bool) -> dict:
    """Part 1: the loop's step of ours and naive at each task, each variant alone on the GPU."""
    from kernel_profile import profile_step

    gpu = torch.cuda.get_device_name(device)
    peak, peak_note = peak_for(gpu, precision.name)
    images, targets = _inputs(device, batch)
    resident: dict = {}

    def build_one(key):
        resident[key] = allocated_mib(device)  # what lives before the variant is built: the input batch only
        t, variant = key
        return BenchStep(MODEL, variant, t, RANK, device, precision, images, targets)

    def measure(key, step: BenchStep) -> dict:
        timeit(step, device, warmup=3, repeats=1)  # warm-up: allocations, cuBLAS handles, kernel choices
        memory = peak_mib(device)
        flops = step_flops(step, step.model.backbone, batch)[1]
        sec = throughput(step, device, steps=repeats, warmup=1)
        t, variant = key
        tflops = flops / sec / 1e12
        row = {"task": t, "variant": variant, "ms_per_step": 1000 * sec, "images_per_s": batch / sec,
               "gflop_per_step": flops / 1e9, "tflops": tflops,
               "fraction_of_peak": None if peak is None else tflops / peak,
               "peak_memory_mib": memory, "resident_before_mib": resident[key]}
        if profile and key == (1, "ours"):
            row["profile"] = profile_step(step, device)
        return row

    rows = list(measure_alone([(t, v) for t in TASKS for v in ("ours", "naive")], build_one, measure,
                              device).values())
    ms = {(r["task"], r["variant"]): r["ms_per_step"] for r in rows}
    out = {"gpu": gpu, "precision": precision.name, "batch": batch, "peak_tflops": peak, "peak_note": peak_note,
           "deterministic": torch.are_deterministic_algorithms_enabled(),
           "rows": [{k: v for k, v in r.items() if k != "profile"} for r in rows],
           "naive_over_ours_task10": ms[(10, "naive")] / ms[(10, "ours")],
           "ours_task20_over_task1": ms[(20, "ours")] / ms[(1, "ours")]}
    out.update({"profile": r["profile"] for r in rows if "profile" in r})
    return out


def compiled(device, precision, batch: int, repeats: int) -> dict:
    """Part 2: the step of ours at task 1 with and without torch.compile on the loop's forward module (as
    ``train.compile`` does), each alone on the GPU."""
    images, targets = _inputs(device, batch)

    def measure(on, step: BenchStep) -> dict:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        sec = throughput(step, device, steps=repeats, warmup=2)
        return {"images_per_s": batch / sec, "ms_per_step": 1000 * sec, "first_step_s": first}

    build_one = lambda on: BenchStep(MODEL, "ours", 1, RANK, device, precision, images, targets,  # noqa: E731
                                     compile=on)
    res = measure_alone([False, True], build_one, measure, device)
    out = {"eager": res[False], "compile": res[True]}
    out["speedup"] = out["eager"]["ms_per_step"] / out["compile"]["ms_per_step"]
    return out


def covariance_and_evaluation(device, precision, images: int) -> dict:
    """Part 3: the covariance pass (full fp32, as the loop runs it) and evaluation images/s."""
    from inflora_ray.core.subspace import covariance_sums

    def covariance() -> float:
        model, _ = build(MODEL, "ours", 1, RANK, device)
        batches = [torch.rand(min(128, images - b), 3, SIZE, SIZE).to(device) for b in range(0, images, 128)]
        run = lambda: covariance_sums(model, model.adapters, batches, forward=model.features)  # noqa: E731
        run()
        return timeit(run, device, warmup=0, repeats=3)

    out = {"covariance_images_per_s": images / covariance()}
    for t in (1, 10):
        free(device)
        model, _ = build(MODEL, "ours", t, RANK, device)
        x = torch.rand(256, 3, SIZE, SIZE).to(device)

        def evaluate(model=model, x=x):
            with torch.no_grad(), precision.autocast():
                model(x).argmax(1)
        out[f"evaluation_images_per_s_task{t}"] = 256 / timeit(evaluate, device, warmup=2, repeats=5)
    return out


def input_pipeline(device, images: int, workers: int) -> dict:
    """Part 4: the device pipeline on generated JPEGs (ImageNet-R's layout and sizes), after the first pass,
    with batched views (the GPU's default) and per-image views; the views against the CPU path's."""
    from device_pipeline import cpu_ms_per_image, pipeline_difference, view_difference
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
        out: dict = {"images": len(idx)}
        pipes = {}
        for batched, way in ((True, ""), (False, "per_image_")):
            p = pipes[batched] = DevicePipeline(train, device, cache_bytes=16 << 30, loader_workers=workers,
                                                batched=batched)
            t0 = time.perf_counter()
            first_ms = cpu_ms_per_image([lambda: p.loader(epoch(0))])
            torch.cuda.synchronize(device)
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            later_ms = cpu_ms_per_image([lambda e=e: p.loader(epoch(e)) for e in (1, 2, 3)])
            torch.cuda.synchronize(device)
            later_s = time.perf_counter() - t0
            out.update({f"{way}first_pass_images_per_s": len(idx) / first_s,
                        f"{way}first_pass_cpu_ms_per_image": first_ms,
                        f"{way}later_images_per_s": 3 * len(idx) / later_s, f"{way}later_cpu_ms_per_image": later_ms})
            out["gpu_jpeg_decode"] = p.gpu_decode
        # The views of an epoch, from the caches the timed passes filled (nothing decoded again).
        for batched, way in ((True, ""), (False, "per_image_")):
            mean, mx = view_difference(pipes[batched], train, epoch(1))
            out.update({f"{way}view_difference_vs_cpu_path_mean": mean,
                        f"{way}view_difference_vs_cpu_path_max": mx})
        mean, mx = pipeline_difference(pipes[True], pipes[False], epoch(1))
        out.update({"batched_vs_per_image_mean": mean, "batched_vs_per_image_max": mx})
        return out


def real_loop(loader_workers: int, repeats: int, timeout: int) -> dict:
    """Part 5: the real training loop through Ray Train on the GPU beside the step (``bench/loop.py``)."""
    from loop import SIZES, measure

    return measure(SIZES["gpu"], cpu=False, loader_workers=loader_workers, repeats=repeats, timeout=timeout)


def quickstart(timeout: int) -> dict:
    """Part 6: the quickstart through Ray Train on one GPU (NCCL), as a user runs it."""
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
    from kernel_profile import markdown as profile_markdown

    lines = [f"GPU figures on {res['machine']} (`python bench/gpu.py`), ViT-B/16 224 px, rank {RANK}.", ""]
    tr = res.get("training", {})
    if "rows" in tr:
        lines += [f"Training step (the loop's `train_step`, current head), batch {tr['batch']}, {tr['precision']}, "
                  f"deterministic algorithms {'on' if tr['deterministic'] else 'off'}; each variant alone on the "
                  f"GPU. Dense peak: {tr['peak_note']}.", "",
                  "| task | variant | ms/step | images/s | GFLOP/step | TFLOP/s | of peak | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            frac = "" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.1%}"
            lines.append(f"| {r['task']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | "
                         f"{r['gflop_per_step']:.1f} | {r['tflops']:.1f} | {frac} | {r['peak_memory_mib']:.0f} |")
        lines += ["", f"naive / ours at task 10: {tr['naive_over_ours_task10']:.2f}x; ours task 20 / task 1: "
                      f"{tr['ours_task20_over_task1']:.3f}. Peak MiB: the allocator's peak with the variant "
                      f"alone (the input batch, {tr['rows'][0]['resident_before_mib']:.0f} MiB, included).", ""]
        if "profile" in tr:
            lines += profile_markdown(tr["profile"], "Profile of ours at task 1 (torch.profiler)")
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
        for way, label in (("", "batched views"), ("per_image_", "per-image views")):
            rows.append((f"input pipeline (device, {label}), images/s after the first pass",
                         f"{ip[way + 'later_images_per_s']:.0f} ({ip[way + 'later_cpu_ms_per_image']:.3f} host "
                         "CPU-ms/image)"))
        rows.append(("input pipeline, first pass (decode into the cache)",
                     f"{ip['first_pass_images_per_s']:.0f} images/s ({ip['first_pass_cpu_ms_per_image']:.3f} "
                     f"host CPU-ms/image, GPU JPEG decode: {ip['gpu_jpeg_decode']})"))
        for way, label in (("", "batched"), ("per_image_", "per-image")):
            rows.append((f"input pipeline, {label} views vs the CPU path (pixels in [0, 1])",
                         f"mean {ip[way + 'view_difference_vs_cpu_path_mean']:.3g}, max "
                         f"{ip[way + 'view_difference_vs_cpu_path_max']:.3g}"))
        rows.append(("input pipeline, batched vs per-image views (pixels in [0, 1])",
                     f"mean {ip['batched_vs_per_image_mean']:.3g}, max {ip['batched_vs_per_image_max']:.3g}"))
    lp = res.get("loop", {})
    if "loop_images_per_s" in lp:
        rows.append(("real loop through Ray Train (last task) / the step, images/s",
                     f"{lp['loop_images_per_s']:.0f} / {lp['step']['images_per_s']:.0f} "
                     f"({lp['loop_over_step']:.3f}; goal >= 0.9)"))
    q = res.get("quickstart", {})
    if "final_accuracy" in q:
        rows.append(("quickstart on 1 GPU (NCCL), final / average incremental accuracy (pooled)",
                     f"{q['final_accuracy']:.3f} / {q['average_incremental_accuracy']:.3f} in {q['wall_s']:.0f} s"))
    lines += ["| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    if "loop_images_per_s" in lp:
        lines += ["", f"Real loop: `{lp['command']}`"]
    errors = [f"- {part}: {v['error']}" for part, v in res.items() if isinstance(v, dict) and "error" in v]
    return "\n".join(lines + (["", "Errors:"] + errors if errors else [])) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-figures", help="folder for gpu.json and gpu.md")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20, help="back-to-back steps timed per variant")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.profiler summary of ours at task 1 (default: on)")
    p.add_argument("--cov-images", type=int, default=1024)
    p.add_argument("--pipeline-images", type=int, default=1600)
    p.add_argument("--loader-workers", type=int, default=4)
    p.add_argument("--loop-timeout", type=int, default=300)
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
    train = train_config()
    loop_backend(device, train)  # before any CUDA work: cuBLAS reads its workspace setting when it starts
    precision = Precision.for_device(train.precision, device)
    res: dict = {"machine": machine(), "torch": torch.__version__, "plan": plan(args)}
    t0 = time.perf_counter()
    _timed("training", lambda: training(device, precision, args.batch, args.repeats, args.profile), res)
    _timed("compile", lambda: compiled(device, precision, args.batch, max(5, args.repeats // 2)), res)
    _timed("covariance_and_evaluation", lambda: covariance_and_evaluation(device, precision, args.cov_images), res)
    _timed("input_pipeline", lambda: input_pipeline(device, args.pipeline_images, args.loader_workers), res)
    free(device)
    _timed("loop", lambda: real_loop(args.loader_workers, args.repeats, args.loop_timeout), res)
    free(device)
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
