"""bench/gpu.py on a machine without a GPU: it says what it would measure and exits 0 without writing
anything; its table of GPU peaks."""
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from gpu import peak_tflops  # noqa: E402


def test_without_a_gpu_it_prints_the_plan_and_exits_0(tmp_path):
    out = tmp_path / "figures"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU on this machine" in proc.stdout
    for part in ("training step", "torch.compile", "covariance pass", "evaluation", "input pipeline",
                 "--config quickstart --use-gpu"):
        assert part in proc.stdout
    assert not out.exists()


def test_peaks_by_gpu_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("NVIDIA L40S", "bf16") == 362.0 and peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert peak_tflops("Tesla T4", "bf16") is None and peak_tflops("Tesla T4", "fp16") == 65.0
    assert peak_tflops("Some Future GPU", "bf16") is None
