"""Low-rank branches on the key and value thirds of a fused ``qkv`` projection.

``qkv(x) = W x + b + [0; B_k A x; B_v A x]``: one down-projection ``A`` (rank x d_in) shared by the key
and value branches (both read the same input, so one covariance designs both), two up-projections
``B_k``, ``B_v`` (d x rank). Finished tasks are merged into ``W`` so a step costs the same at every task.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_PARAM_NAMES = ("lora_A", "lora_B_k", "lora_B_v")


def check_rank(rank: int, in_features: int) -> None:
    """The one rank-vs-width rule: ``A`` has ``rank`` orthogonal rows in a ``in_features``-dim input space."""
    if rank > in_features:
        raise ValueError(f"method.rank={rank} is larger than the adapted layers' input dim {in_features}; "
                         f"use method.rank <= {in_features}")


class KVLoRAQKV(nn.Module):
    """A frozen fused qkv Linear plus the current task's low-rank k/v branch.

    The state-dict keys ``weight``/``bias`` match timm's ``qkv`` Linear, so backbone weights load as usual.
    """

    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__()
        if qkv.out_features % 3:
            raise ValueError(f"fused qkv must have 3*d outputs, got {qkv.out_features}")
        self.in_features = qkv.in_features
        self.out_features = qkv.out_features
        self.dim = qkv.out_features // 3
        self.rank = rank
        self.weight = nn.Parameter(qkv.weight.detach().clone(), requires_grad=False)
        self.bias = None if qkv.bias is None else nn.Parameter(qkv.bias.detach().clone(), requires_grad=False)
        factory = dict(device=qkv.weight.device, dtype=qkv.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, **factory), requires_grad=False)
        self.lora_B_k = nn.Parameter(torch.zeros(self.dim, rank, **factory), requires_grad=False)
        self.lora_B_v = nn.Parameter(torch.zeros(self.dim, rank, **factory), requires_grad=False)
        self.register_buffer("_zeros_q", torch.zeros(self.dim, rank, **factory), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        # Low-rank path: (x A^T) [0; B_k; B_v]^T costs 4*d*r per token instead of a dense d x 3d delta.
        b_full = torch.cat([self._zeros_q, self.lora_B_k, self.lora_B_v], dim=0)
        return out + F.linear(F.linear(x, self.lora_A), b_full)

    def set_trainable(self, a: bool, b: bool) -> None:
        """Whether ``A`` (``a``) and the up-projections ``B_k``, ``B_v`` (``b``) receive gradients."""
        self.lora_A.requires_grad_(a)
        self.lora_B_k.requires_grad_(b)
        self.lora_B_v.requires_grad_(b)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The current task's adapter tensors by name (``lora_A``, ``lora_B_k``, ``lora_B_v``)."""
        return {name: getattr(self, name) for name in ADAPTER_PARAM_NAMES}

    def delta_weight(self) -> torch.Tensor:
        """The dense (3d x d_in) update ``[0; B_k A; B_v A]`` of the current branch."""
        a = self.lora_A.detach()
        return torch.cat([torch.zeros(self.dim, self.in_features, device=a.device, dtype=a.dtype),
                          self.lora_B_k.detach() @ a, self.lora_B_v.detach() @ a], dim=0)

    @torch.no_grad()
    def merge_and_reset(self) -> None:
        """Fold the current branch into ``W`` and zero it, ready for the next task."""
        # Accumulate in fp32 even if the weights are stored in lower precision.
        merged = self.weight.float() + self.delta_weight().float()
        self.weight.copy_(merged.to(self.weight.dtype))
        self.lora_A.zero_()
        self.lora_B_k.zero_()
        self.lora_B_v.zero_()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, dim={self.dim}, rank={self.rank}, bias={self.bias is not None}"


def adapt_vit_qkv(backbone: nn.Module, rank: int) -> list[KVLoRAQKV]:
    """Replace ``blocks[i].attn.qkv`` of a timm ViT by :class:`KVLoRAQKV`; return the new layers."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(backbone).__name__} has no .blocks; expected a timm VisionTransformer")
    layers = []
    for i, block in enumerate(blocks):
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear):
            raise ValueError(f"block {i} has no fused attn.qkv Linear (got {type(qkv).__name__}); "
                             "InfLoRA adapts timm ViTs with fused qkv")
        check_rank(rank, qkv.in_features)
        layer = KVLoRAQKV(qkv, rank)
        block.attn.qkv = layer
        layers.append(layer)
    return layers
