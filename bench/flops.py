"""FLOPs of a ViT training step, attention included.

torch's ``FlopCounterMode`` counts matmuls and convolutions, and the GPU attention kernels (flash,
memory-efficient, cuDNN), but not the fused CPU kernel behind ``scaled_dot_product_attention``: on a CPU a
ViT's attention is missing from its count (about 17 GFLOP per step for ViT-B/16 at batch 4). Attention FLOPs
have a closed form, so :func:`step_flops` replaces whatever the counter saw of the attention kernels by it.

Attention FLOPs per block, batch B, N tokens, width D = heads x head_dim (a multiply-add is 2 FLOPs):

- forward: ``S = Q K^T`` and ``O = P V`` (``P = softmax(S)``) are batched matmuls over B x heads of
  (N x head_dim)(head_dim x N) and (N x N)(N x head_dim): 2 B heads N^2 head_dim each, 4 B N^2 D together;
- backward: ``dP = dO V^T``, ``dV = P^T dO``, ``dQ = dS K``, ``dK = dS^T Q``: four matmuls of the same size,
  8 B N^2 D, when q, k and v all need gradients. In an adapted ViT they do in every block: the adapted qkv
  projection's output is one tensor, and it depends on trainable parameters.

So a training step costs 12 B N^2 D per block (3x the forward), a forward alone 4 B N^2 D. Softmax,
scaling and dropout are elementwise and not counted (FlopCounterMode counts no elementwise work). The GPU
kernels' counts include the flash backward's recomputation of ``S`` (5 matmuls instead of 4); the
corrected figure counts the model's FLOPs, without recomputation, on every device.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _addmm_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    """``self + a @ b``: 2 m k n (the addition is elementwise, not counted, as for ``addmm``)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# FlopCounterMode has no formula for the in-place ``addmm_``, by which the adapted qkv projection adds its k/v
# branch into the projection's output (inflora_ray/core/lora.py); it costs what ``addmm`` costs.
IN_PLACE_FORMULAS = {torch.ops.aten.addmm_: _addmm_flops}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts the in-place matmuls the adapted layers use."""
    return FlopCounterMode(display=False, custom_mapping=IN_PLACE_FORMULAS)


def attention_flops(batch: int, tokens: int, dim: int, depth: int, backward: bool = True) -> int:
    """FLOPs of the attention matmuls (``Q K^T`` and ``P V``) of ``depth`` blocks: ``4 B N^2 D`` per block
    forward, three times that with the backward (all of q, k, v needing gradients)."""
    return depth * 4 * batch * tokens ** 2 * dim * (3 if backward else 1)


def vit_attention_flops(backbone: nn.Module, batch: int, backward: bool = True, fused_only: bool = False) -> int:
    """:func:`attention_flops` of a timm ViT at its configured image size (patches + prefix tokens); with
    ``fused_only``, of the blocks whose attention runs the fused kernel (timm's ``attn.fused_attn``) only."""
    tokens = backbone.patch_embed.num_patches + getattr(backbone, "num_prefix_tokens", 1)
    blocks = [b for b in backbone.blocks if not fused_only or getattr(b.attn, "fused_attn", True)]
    return attention_flops(batch, tokens, backbone.embed_dim, len(blocks), backward)


def counted_flops(fn: Callable[[], None]) -> tuple[int, int]:
    """FlopCounterMode's total for one call of ``fn``, and the part of it in attention kernels."""
    with flop_counter() as counter:
        fn()
    per_op = counter.get_flop_counts().get("Global", {})
    attention = sum(n for op, n in per_op.items() if "scaled_dot_product" in str(op))
    return counter.get_total_flops(), attention


def step_flops(fn: Callable[[], None], backbone: nn.Module, batch: int, backward: bool = True) -> tuple[int, int]:
    """(counted, corrected) FLOPs of one call of ``fn`` on ``backbone``: as FlopCounterMode counts them, and
    with the fused attention kernels' count (none on a CPU) replaced by :func:`vit_attention_flops` of the
    blocks that use them (blocks on timm's unfused path run plain matmuls, which the counter sees)."""
    total, attention = counted_flops(fn)
    return total, total - attention + vit_attention_flops(backbone, batch, backward, fused_only=True)
