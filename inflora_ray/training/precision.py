"""Training precision: what ``train.precision`` resolves to on a device, the autocast a training or evaluation
forward runs under, the frozen backbone's weights held in that precision, and the gradient scaler that fp16
needs. Covariance passes never use any of this: they run in full fp32
(:func:`inflora_ray.core.subspace.full_fp32`).

Under bf16/fp16 the matmuls (linear layers, the patch convolution, the adapted qkv projection) compute in the
low precision, as autocast casts their operands; LayerNorm, the residual stream, the position embedding and the
loss stay fp32, as autocast leaves them. This is deliberate: the residual stream sums every block's update,
and in bf16 (8 significant bits) small updates would be rounded away; LayerNorm's statistics are sums too.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import torch
from torch import nn

from ..core.lora import KVLoRAQKV

Resolved = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Modules whose weight and bias autocast casts to the low precision on every forward (they feed a matmul or
# a convolution), so holding them in it changes no result.
_MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, KVLoRAQKV)


@contextlib.contextmanager
def frozen_weights_in(backbone: nn.Module, dtype: Optional[torch.dtype]) -> Iterator[int]:
    """Within the block, the frozen fp32 weights and biases of ``backbone``'s matmul modules (linear, conv, the
    adapted qkv projection, not its adapter) are held in ``dtype``, a copy made once; on exit the fp32 tensors
    are put back, bit for bit, for the covariance passes and the merges, which need them. Yields how many
    tensors were converted (0 with ``dtype`` None, fp32).

    Autocast would cast each of these weights to ``dtype`` on every forward (it caches casts of trainable
    leaves only), so the results are the same and each step reads half the weight bytes and writes none.
    Trainable tensors (a method that trains the backbone) are left alone: the optimizer updates them in fp32.
    """
    held: list[tuple[nn.Parameter, torch.Tensor]] = []
    if dtype is not None:
        for module in backbone.modules():
            if not isinstance(module, _MATMUL_MODULES):
                continue
            for p in (module.weight, module.bias):
                if p is not None and not p.requires_grad and p.dtype == torch.float32:
                    held.append((p, p.data))
                    p.data = p.data.to(dtype)
    try:
        yield len(held)
    finally:
        for p, fp32 in held:
            p.data = fp32


def resolve_precision(choice: str, device_type: str, bf16_supported: bool) -> Resolved:
    """The precision ``train.precision`` gives on a device: an explicit ``fp32``/``bf16``/``fp16`` is kept;
    ``auto`` is bf16 on a GPU with native bf16, fp16 (with a gradient scaler) on a GPU without it, and fp32
    on a CPU."""
    if choice != "auto":
        return choice  # type: ignore[return-value]
    if device_type == "cuda":
        return "bf16" if bf16_supported else "fp16"
    return "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a GPU that computes in bf16 natively (compute capability 8.0 and later, or ROCm);
    GPUs that only emulate bf16 (V100, T4) and CPUs count as no."""
    if device.type != "cuda":
        return False
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class Precision:
    """A resolved precision on one device type."""
    name: Resolved
    device_type: str

    @classmethod
    def for_device(cls, choice: str, device: torch.device) -> "Precision":
        """Resolve ``train.precision`` for ``device``; an explicit bf16 on a GPU without native bf16 is
        refused (it would be emulated, slowly or not at all)."""
        supported = native_bf16(device)
        name = resolve_precision(choice, device.type, supported)
        if name == "bf16" and device.type == "cuda" and not supported:
            raise RuntimeError(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no native "
                               "bf16; use train.precision=fp16 or auto (fp16 with a gradient scaler there)")
        return cls(name, device.type)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype (None: fp32, no autocast)."""
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region of a training or evaluation forward (disabled for fp32)."""
        if self.dtype is None:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)

    def frozen_weights(self, backbone: nn.Module) -> contextlib.AbstractContextManager:
        """:func:`frozen_weights_in` this precision's dtype (does nothing for fp32)."""
        return frozen_weights_in(backbone, self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for fp16 only (a disabled scaler passes the loss and step through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")
