"""Low-rank branches on the key and value thirds of a fused ``qkv`` projection.

``qkv(x) = W x + b + [0; B_k A x; B_v A x]``: one down-projection ``A`` (rank x d_in) shared by the key
and value branches (both read the same input, so one covariance designs both), two up-projections
``B_k``, ``B_v`` (d x rank). The branch's output is added straight into the k and v columns of the fused
projection (:class:`_KVLoRALinear`). Finished tasks are merged into ``W`` so a step costs the same at every
task.
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


class _KVLoRALinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``(x A^T) [B_k; B_v]^T`` added in place into the k and v columns of ``y``.

    2-D operands of one dtype. Compared with adding ``(x A^T) [0; B_k; B_v]^T`` to ``y``, no matmul runs over
    a zero q block and no 3d-wide temporary is written, forward or backward: per token the branch costs
    ``2 r (d_in + 2d)`` FLOPs forward and about twice that backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b_kv):
        dim = weight.shape[0] // 3
        out = F.linear(x, weight, bias)
        z = x @ lora_a.t()  # (n, rank): the only extra activation kept for backward
        out[:, dim:].addmm_(z, lora_b_kv.t())
        ctx.save_for_backward(x, weight, lora_a, lora_b_kv, z)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b_kv, z = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_b_kv = ctx.needs_input_grad
        dim = weight.shape[0] // 3
        grad_kv = grad_out[:, dim:]  # a strided view: the q columns never enter the branch's matmuls
        grad_x = grad_w = grad_b = grad_a = grad_b_kv = None
        grad_z = grad_kv @ lora_b_kv if need_x or need_a else None
        if need_x:
            grad_x = (grad_out @ weight).addmm_(grad_z, lora_a)
        if need_w:
            grad_w = grad_out.t() @ x
        if need_b:
            grad_b = grad_out.sum(0)
        if need_a:
            grad_a = grad_z.t() @ x
        if need_b_kv:
            grad_b_kv = grad_kv.t() @ z
        return grad_x, grad_w, grad_b, grad_a, grad_b_kv


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast every operand is cast to the autocast dtype, as F.linear would cast them.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        b_kv = torch.cat([self.lora_B_k, self.lora_B_v], dim=0)
        flat = x.reshape(-1, self.in_features)
        out = _KVLoRALinear.apply(flat.to(dtype), self.weight.to(dtype),
                                  None if self.bias is None else self.bias.to(dtype), self.lora_A.to(dtype),
                                  b_kv.to(dtype))
        return out.view(*x.shape[:-1], self.out_features)

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
        """Fold the current branch into ``W`` (its k and v rows) and zero it, ready for the next task."""
        a = self.lora_A.float()
        kv_rows = self.weight[self.dim:]
        # Accumulate in fp32 even if the weights are stored in lower precision.
        merged = kv_rows.float() + torch.cat([self.lora_B_k.float() @ a, self.lora_B_v.float() @ a], dim=0)
        kv_rows.copy_(merged.to(self.weight.dtype))
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
