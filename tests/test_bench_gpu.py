"""bench/gpu.py on a machine without a GPU: it says what it would measure and exits 0 without writing
anything; its table of GPU peaks by exact name; its step, which must be the training loop's own step (current
head, the method's loss); its variants measured one at a time; and its kernel profile, classified on a real
profile of a tiny step on the CPU."""
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from common import BenchStep, build, measure_alone  # noqa: E402
from gpu import main as gpu_main  # noqa: E402
from kernel_profile import KINDS, classify, profile_step  # noqa: E402
from peaks import KNOWN_NAMES, PEAKS, canonical_name, peak_for, peak_tflops  # noqa: E402

from inflora_ray.training.learner import _CurrentTask  # noqa: E402
from inflora_ray.training.optim import make_optimizer  # noqa: E402
from inflora_ray.training.precision import Precision  # noqa: E402
from inflora_ray.training.step import train_step  # noqa: E402

CPU = torch.device("cpu")
FP32 = Precision.for_device("fp32", CPU)


def test_without_a_gpu_or_with_dry_run_it_prints_the_plan_and_exits_0(tmp_path, capsys):
    out = tmp_path / "figures"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU on this machine" in proc.stdout
    assert gpu_main(["--dry-run", "--out", str(out)]) == 0
    dry = capsys.readouterr().out
    assert "--dry-run" in dry and "torch.profiler" in dry
    assert gpu_main(["--dry-run", "--no-profile"]) == 0 and "torch.profiler" not in capsys.readouterr().out
    for part in ("training step (the loop's train_step, current head)", "each variant alone on the GPU",
                 "torch.profiler summary", "torch.compile", "covariance pass", "evaluation", "input pipeline",
                 "batched and per-image views", "real training loop vs the step: -m inflora_ray.run --config "
                 "imagenet-r-10", "data.pipeline=device", "--config quickstart --use-gpu"):
        assert part in proc.stdout
    assert not out.exists()


def test_peaks_by_exact_gpu_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.5
    assert peak_tflops("NVIDIA H200", "bf16") == 989.4 and peak_tflops("NVIDIA H200 NVL", "bf16") == 835.5
    for a100 in ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"):
        assert peak_tflops(a100, "bf16") == 312.0
    assert peak_tflops("NVIDIA L40S", "bf16") == 362.05 and peak_tflops("NVIDIA L4", "bf16") == 121.0
    # Exact names: an L40 is not an L4, an A10G not an A10 (its figure is not published: None, with why).
    assert peak_tflops("NVIDIA L40", "bf16") == 181.05
    assert peak_tflops("NVIDIA A10", "bf16") == 125.0
    value, note = peak_for("NVIDIA A10G", "bf16")
    assert value is None and "A10G" in note and "no NVIDIA data sheet" in note
    assert peak_tflops("Tesla V100-SXM2-32GB", "fp16") == 125.0 and peak_tflops("Tesla V100-PCIE-16GB", "fp16") == 112.0
    assert peak_tflops("Tesla T4", "bf16") is None and peak_tflops("Tesla T4", "fp16") == 65.0
    value, note = peak_for("Some Future GPU", "bf16")
    assert value is None and "not in the table" in note
    # Names are normalised (vendor prefix, case, spaces), never matched by prefix or substring.
    assert canonical_name("  NVIDIA  H100   PCIe ") == "h100 pcie" and canonical_name("Tesla T4") == "t4"
    for near_miss in ("NVIDIA L40S-X", "NVIDIA H100", "NVIDIA A100", "NVIDIA L4 Pro", "NVIDIA A10 Ti"):
        assert peak_tflops(near_miss, "bf16") is None
    assert set(KNOWN_NAMES.values()) == set(PEAKS)


def _tiny_batch(batch=6, classes=10):
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, 16, 16, generator=g), torch.randint(0, classes, (batch,), generator=g)


@pytest.mark.parametrize("variant", ["ours", "naive"])
def test_the_bench_step_is_the_training_step(variant):
    images, targets = _tiny_batch()
    tasks = 3
    with BenchStep("tiny", variant, tasks, 4, CPU, FP32, images, targets) as step:
        model = step.model
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            current = F.cross_entropy(model.heads[-1](model.features(images)), targets, reduction="sum")
            every_head = F.cross_entropy(model(images), targets, reduction="sum")
        loss = step()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The same step by the loop's own pieces, on the same model built the same way.
    twin, trainable = build("tiny", variant, tasks, 4, CPU)
    head = twin.heads[tasks - 1]
    adapters = [p for p in trainable if all(p is not q for q in head.parameters())]
    optimizer = make_optimizer(step.train, adapters, head)
    want = train_step(_CurrentTask(twin, step.module.method, [tasks - 1]), images, targets, len(targets), optimizer,
                      FP32.scaler(), FP32.autocast, step.train.grad_clip)
    assert torch.equal(loss, want)
    assert torch.allclose(loss, current) and not torch.allclose(loss, every_head)  # the current head only
    assert grads.keys() == {n for n, p in twin.named_parameters() if p.grad is not None}
    for n, p in twin.named_parameters():
        if p.grad is not None:
            assert torch.equal(grads[n], p.grad), n
        assert torch.equal(after[n], p.detach()), n
    # Only the current task's adapter (B of k and v) and head moved; earlier heads and the backbone did not.
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert f"heads.{tasks - 1}.weight" in moved and not any(n.startswith(("heads.0.", "heads.1.")) for n in moved)
    assert moved and all(n.startswith(f"heads.{tasks - 1}.") or "B_" in n or "lora_B" in n for n in moved)


def test_each_variant_is_measured_alone_and_its_weights_put_back():
    images, targets = _tiny_batch()
    alive: list[weakref.ref] = []
    seen = []

    def build_one(key):
        gc.collect()
        seen.append(sum(r() is not None for r in alive))  # earlier variants' models still alive at this build
        step = BenchStep("tiny", key[1], key[0], 4, CPU, FP32, images, targets)
        alive.append(weakref.ref(step.model))
        return step

    res = measure_alone([(1, "ours"), (1, "naive"), (3, "ours")], build_one, lambda k, s: float(s()), CPU)
    assert seen == [0, 0, 0] and all(r() is None for r in alive)
    assert list(res) == [(1, "ours"), (1, "naive"), (3, "ours")] and all(v > 0 for v in res.values())
    if not hasattr(Precision, "frozen_weights"):
        return
    # Under bf16 the step holds the frozen weights in bf16 while it is open, as the loop does for a task, and
    # closing it puts the fp32 tensors back bit for bit.
    bf16 = Precision("bf16", "cpu")
    step = BenchStep("tiny", "ours", 1, 4, CPU, bf16, images, targets)
    fc1 = step.model.backbone.blocks[0].mlp.fc1
    weight = build("tiny", "ours", 1, 4, CPU)[0].backbone.blocks[0].mlp.fc1.weight  # built alike, never converted
    assert fc1.weight.dtype == torch.bfloat16
    step()
    step.close()
    assert fc1.weight.dtype == torch.float32 and torch.equal(fc1.weight, weight)


def test_kernel_profile_of_a_tiny_cpu_step():
    images, targets = _tiny_batch(8)
    with BenchStep("tiny", "ours", 2, 4, CPU, FP32, images, targets) as step:
        summary = profile_step(step, CPU, steps=2, warmup=1, top=200)
    assert summary["events"] == "ATen operators, self CPU time" and summary["ms_per_step"] > 0
    shares = summary["shares"]
    assert list(shares) == KINDS and abs(sum(shares.values()) - 1) < 1e-9
    kinds = {r["name"]: r["kind"] for r in summary["top"]}
    assert all(kind == classify(name) for name, kind in kinds.items())
    # The tiny ViT's own operators land where they belong.
    assert kinds["aten::addmm"] == "matmul" and kinds["aten::native_layer_norm"] == "layernorm"
    assert any(k == "attention" and "scaled_dot_product" in n for n, k in kinds.items())
    assert kinds["aten::gelu"] == "elementwise"
    for kind in ("matmul", "attention", "layernorm", "elementwise"):
        assert shares[kind] > 0, kind
    # CUDA kernel names as the profiler reports them on a GPU.
    assert classify("void pytorch_flash::flash_bwd_convert_dq_kernel<Flash_bwd_kernel_traits<64>>(Flash_bwd_params)") \
        == "attention"
    assert classify("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)") == "attention"
    assert classify("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNN") == "matmul"
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1") == "matmul"
    assert classify("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int)") \
        == "layernorm"
    assert classify("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>") \
        == "elementwise"
    assert classify("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>") == "other"
