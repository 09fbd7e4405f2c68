"""Where a training step's time goes: a ``torch.profiler`` summary by kernel, and by kind of work.

:func:`profile_step` runs a step a few times under ``torch.profiler`` and :func:`summarize` turns the events
into the top kernels by time and the shares of five kinds of work. On a GPU the events are the CUDA kernels
(their device time); on a CPU, where there are no kernels, the ATen operators' own CPU time (``aten::...``
events, their children's time excluded), so the same summary can be checked on a CPU.

Each name is classified by the first rule that matches its lower-cased name (:data:`RULES`, in order):

1. **attention**: the fused attention kernels and operators: ``flash``, ``fmha``, ``attention``, ``sdpa``,
   ``scaled_dot_product``, ``mha`` (flash / memory-efficient / cuDNN attention, forward and backward; they
   contain GEMMs, so this rule comes before the matmul rule);
2. **layernorm**: ``layer_norm``, ``layernorm``, ``gammabeta`` (LayerNorm forward and backward, and the
   backward's gamma/beta reduction kernel);
3. **matmul**: ``gemm``, ``gemv``, ``cutlass``, ``xmma``, ``nvjet``, ``cublas``, ``wgmma`` (cuBLAS and CUTLASS
   GEMM kernels carry one of these), ``convolution``, ``conv2d``, ``fprop``, ``dgrad``, ``wgrad`` (the patch
   embedding's convolution), and the matmul operators on a CPU: ``aten::mm``, ``aten::addmm``,
   ``aten::bmm``, ``aten::matmul``, ``aten::linear``, ``aten::baddbmm``;
4. **elementwise**: ``elementwise`` (PyTorch's elementwise kernel templates, on a GPU nearly every
   activation, cast, copy, fill and arithmetic kernel), ``multi_tensor_apply`` and ``foreach`` (the
   optimizer's fused kernels), ``catarray`` (concatenation), ``gelu``, and on a CPU ``aten::add``,
   ``aten::mul``, ``aten::sub``, ``aten::div``, ``aten::lerp``, ``aten::sqrt``, ``aten::copy``,
   ``aten::fill``, ``aten::zero``, ``aten::cat``, ``aten::where``, ``aten::to``, ``aten::_to_copy``,
   ``aten::clone`` (the prefix matches the in-place forms too);
5. **other**: everything else (reductions, the loss's softmax, indexing, copies between host and device,
   the CPU's view operators, ...).

The summary lists the top names with their kind, so a kernel that falls to "other" by a name these rules
do not know is visible there.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import DeviceType

RULES: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "mha")),
    ("layernorm", ("layer_norm", "layernorm", "gammabeta")),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "convolution", "conv2d", "fprop",
                "dgrad", "wgrad", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                "aten::baddbmm")),
    ("elementwise", ("elementwise", "multi_tensor_apply", "foreach", "catarray", "gelu", "aten::add",
                     "aten::mul", "aten::sub", "aten::div", "aten::lerp", "aten::sqrt", "aten::copy",
                     "aten::fill", "aten::zero", "aten::cat", "aten::where", "aten::to", "aten::_to_copy",
                     "aten::clone")),
]
KINDS = [kind for kind, _ in RULES] + ["other"]


def classify(name: str) -> str:
    """The kind of work of a kernel or operator ``name``: the first of :data:`RULES` matching, else other."""
    low = name.lower()
    for kind, needles in RULES:
        if any(n in low for n in needles):
            return kind
    return "other"


def kernel_times(prof: torch.profiler.profile, device_type: str) -> dict[str, tuple[float, int]]:
    """Per kernel (CUDA) or ATen operator (CPU) name: (self time in microseconds, calls) in ``prof``."""
    out: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        if device_type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:  # torch before 2.4 names it after CUDA
                us = e.self_cuda_time_total
        else:
            if e.device_type != DeviceType.CPU or not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            t, n = out.get(e.key, (0.0, 0))
            out[e.key] = (t + us, n + e.count)
    return out


def summarize(times: dict[str, tuple[float, int]], steps: int, top: int = 15) -> dict:
    """The profile of ``steps`` steps: milliseconds per step, the share of each kind (:data:`KINDS`), and the
    ``top`` names by time with their kind, ms per step, share and calls per step."""
    total = sum(t for t, _ in times.values())
    by_kind = {k: 0.0 for k in KINDS}
    for name, (t, _) in times.items():
        by_kind[classify(name)] += t
    ranked = sorted(times.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "steps": steps,
        "ms_per_step": total / 1000 / steps,
        "shares": {k: (v / total if total else 0.0) for k, v in by_kind.items()},
        "top": [{"name": name[:160], "kind": classify(name), "ms_per_step": t / 1000 / steps,
                 "share": t / total if total else 0.0, "calls_per_step": n / steps}
                for name, (t, n) in ranked],
    }


def profile_step(step: Callable[[], object], device: torch.device, steps: int = 5, warmup: int = 2,
                 top: int = 15) -> dict:
    """:func:`summarize` of ``steps`` calls of ``step`` (after ``warmup`` unprofiled ones) on ``device``."""
    for _ in range(warmup):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = summarize(kernel_times(prof, device.type), steps, top)
    out["events"] = "CUDA kernels, device time" if device.type == "cuda" else "ATen operators, self CPU time"
    return out


def markdown(summary: dict, title: str) -> list[str]:
    """Markdown lines of a :func:`summarize` result: the shares, then the top kernels."""
    shares = ", ".join(f"{k} {summary['shares'][k]:.1%}" for k in KINDS)
    lines = [f"{title}: {summary['ms_per_step']:.1f} ms per step of {summary['events']}; {shares}.", "",
             "| kernel | kind | ms/step | share | calls/step |", "|---|---|---|---|---|"]
    for r in summary["top"]:
        name = r["name"].replace("|", "\\|")
        lines.append(f"| `{name[:90]}` | {r['kind']} | {r['ms_per_step']:.2f} | {r['share']:.1%} | "
                     f"{r['calls_per_step']:.0f} |")
    return lines + [""]
