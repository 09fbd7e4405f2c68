"""Dense tensor-core peaks of NVIDIA GPUs by their exact name, for the fraction of peak in ``bench/gpu.py``.

``torch.cuda.get_device_name`` gives the board's full name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
"Tesla T4"). :func:`canonical_name` normalises it (drops the "NVIDIA " / "Tesla " prefix, case and repeated
spaces) and :data:`KNOWN_NAMES` maps each known full name to its model. Names are matched exactly, never by
prefix or substring: "NVIDIA L40" is not an L4 and "NVIDIA A10G" not an A10. A name not in the table gives no
peak (None) and says so; a GPU that is in the table but has no published data-sheet figure (the A10G, an AWS
part) gives None too, with the reason.

Figures: NVIDIA data sheets, tensor-core TFLOP/s without sparsity (half of the "with sparsity" figure where
only that one is printed). Ampere and later GPUs run bf16 and fp16 at the same rate; V100 and T4 have no
native bf16, so they carry an fp16 figure only (training runs in fp16 there).
"""
from __future__ import annotations

from typing import NamedTuple, Optional


class Peak(NamedTuple):
    """A GPU model's dense tensor-core peaks (TFLOP/s) by precision, and where they come from."""
    bf16: Optional[float]
    fp16: Optional[float]
    source: str


PEAKS: dict[str, Peak] = {
    "H100 SXM": Peak(989.4, 989.4, "H100 data sheet (SXM): 1,979 with sparsity"),
    "H100 PCIe": Peak(756.0, 756.0, "H100 data sheet (PCIe): 1,513 with sparsity"),
    "H100 NVL": Peak(835.5, 835.5, "H100 data sheet (NVL): 1,671 with sparsity"),
    "H200 SXM": Peak(989.4, 989.4, "H200 data sheet (SXM): 1,979 with sparsity"),
    "H200 NVL": Peak(835.5, 835.5, "H200 data sheet (NVL): 1,671 with sparsity"),
    "A100": Peak(312.0, 312.0, "A100 data sheet (SXM and PCIe, 40 and 80 GB): 624 with sparsity"),
    "L40S": Peak(362.05, 362.05, "L40S data sheet: 733 with sparsity"),
    "L40": Peak(181.05, 181.05, "L40 data sheet: 362.1 with sparsity"),
    "L4": Peak(121.0, 121.0, "L4 data sheet: 242 with sparsity"),
    "A10": Peak(125.0, 125.0, "A10 data sheet: 250 with sparsity"),
    "A10G": Peak(None, None, "no NVIDIA data sheet (an AWS part, not the A10): no peak"),
    "V100 SXM2": Peak(None, 125.0, "V100 data sheet (SXM2), fp16 tensor; no native bf16"),
    "V100 PCIe": Peak(None, 112.0, "V100 data sheet (PCIe), fp16 tensor; no native bf16"),
    "V100S PCIe": Peak(None, 130.0, "V100S data sheet (PCIe), fp16 tensor; no native bf16"),
    "T4": Peak(None, 65.0, "T4 data sheet, fp16 tensor (mixed precision); no native bf16"),
}

# canonical_name(full name) -> model in PEAKS. Full names as torch.cuda.get_device_name / nvidia-smi give them.
KNOWN_NAMES: dict[str, str] = {
    "h100 80gb hbm3": "H100 SXM", "h100 sxm5 80gb": "H100 SXM", "h100 pcie": "H100 PCIe",
    "h100 nvl": "H100 NVL", "h200": "H200 SXM", "h200 nvl": "H200 NVL",
    "a100-sxm4-40gb": "A100", "a100-sxm4-80gb": "A100", "a100-sxm-80gb": "A100", "a100-pcie-40gb": "A100",
    "a100 80gb pcie": "A100",
    "l40s": "L40S", "l40": "L40", "l4": "L4", "a10": "A10", "a10g": "A10G",
    "v100-sxm2-16gb": "V100 SXM2", "v100-sxm2-32gb": "V100 SXM2", "v100-pcie-16gb": "V100 PCIe",
    "v100-pcie-32gb": "V100 PCIe", "v100s-pcie-32gb": "V100S PCIe",
    "t4": "T4",
}


def canonical_name(gpu_name: str) -> str:
    """``gpu_name`` without its vendor prefix ("NVIDIA ", "Tesla "), lower case, single spaces."""
    words = gpu_name.split()
    while words and words[0].lower() in ("nvidia", "tesla"):
        words = words[1:]
    return " ".join(words).lower()


def gpu_model(gpu_name: str) -> Optional[str]:
    """The model in :data:`PEAKS` of a full GPU name, None when the name is not in :data:`KNOWN_NAMES`."""
    return KNOWN_NAMES.get(canonical_name(gpu_name))


def peak_for(gpu_name: str, precision: str) -> tuple[Optional[float], str]:
    """(dense peak TFLOP/s of ``gpu_name`` in ``precision`` (bf16/fp16) or None, a note saying where it comes
    from or why there is none)."""
    model = gpu_model(gpu_name)
    if model is None:
        return None, f"{gpu_name!r} is not in the table of known GPU names (bench/peaks.py): no peak"
    peak = PEAKS[model]
    value = getattr(peak, precision, None)
    if value is None:
        return None, f"{gpu_name!r} is the {model}: no {precision} figure ({peak.source})"
    return value, f"{gpu_name!r} is the {model}: {value} {precision} TFLOP/s dense ({peak.source})"


def peak_tflops(gpu_name: str, precision: str) -> Optional[float]:
    """The dense tensor-core peak of ``gpu_name`` in ``precision``, None when there is none (see
    :func:`peak_for` for why)."""
    return peak_for(gpu_name, precision)[0]
