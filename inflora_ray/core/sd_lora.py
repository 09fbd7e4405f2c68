"""SD-LoRA (Wu et al., ICLR 2025): finished tasks' LoRA directions kept fixed and normalised, their
magnitudes learned.

Each adapted layer's update is ``W0 + sum_k alpha_k * (B_k A_k / ||B_k A_k||_F) + B_t A_t`` (paper Eq. 3 and
Algorithm 1), for the key and the value projection separately: the current task's ``A_t``, ``B_t`` live in
:class:`~inflora_ray.core.lora.KVLoRAQKV`; the finished tasks' directions and magnitudes live here. The forward
stays low-rank: ``x -> x [A_1; ...; A_k]^T`` (k*r columns) then one up-projection whose columns are the
normalised ``B`` scaled by their task's magnitude, so a step costs ``O(k r d)`` per token, never a dense
``d x d`` delta.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SDLoRAComponents(nn.Module):
    """The finished tasks' fixed directions and learned magnitudes of one k/v-adapted layer.

    Room for ``max_tasks`` components is allocated up front (fixed shapes, so the state loads into a freshly
    built model); ``count`` of them are in use. Directions are buffers (never trained); ``magnitude`` is a
    ``(max_tasks, 2)`` parameter: alpha of the key and of the value direction of each task.
    """

    def __init__(self, max_tasks: int, rank: int, in_features: int, dim: int):
        super().__init__()
        self.rank = rank
        self.dim = dim
        self.count = 0
        self.register_buffer("lora_A", torch.zeros(max_tasks * rank, in_features))
        self.register_buffer("dir_B_k", torch.zeros(dim, max_tasks * rank))  # B_k / ||B_k A||_F per task
        self.register_buffer("dir_B_v", torch.zeros(dim, max_tasks * rank))
        self.magnitude = nn.Parameter(torch.zeros(max_tasks, 2), requires_grad=False)

    @property
    def max_tasks(self) -> int:
        return self.magnitude.shape[0]

    @torch.no_grad()
    def add(self, lora_A: torch.Tensor, lora_B_k: torch.Tensor, lora_B_v: torch.Tensor) -> None:
        """Store a finished task's adapter as a normalised direction per projection, with magnitude
        ``||B A||_F`` so that the layer computes exactly what it computed with the unnormalised adapter."""
        k, r = self.count, self.rank
        if k >= self.max_tasks:
            raise ValueError(f"SD-LoRA: room for {self.max_tasks} tasks, all used")
        a = lora_A.detach().to(self.lora_A)
        for j, (b, out) in enumerate(((lora_B_k, self.dir_B_k), (lora_B_v, self.dir_B_v))):
            b = b.detach().to(out)
            norm = float(torch.linalg.matrix_norm(b.double() @ a.double()))
            # A direction of norm 0 (B never left zero) carries nothing: keep it zero with magnitude 0.
            out[:, k * r:(k + 1) * r] = b / norm if norm > 0 else 0.0
            self.magnitude[k, j] = norm
        self.lora_A[k * r:(k + 1) * r] = a
        self.count = k + 1

    def direction(self, task: int, which: int) -> torch.Tensor:
        """The dense normalised direction ``B_k A_k / ||B_k A_k||_F`` of a stored task (``which``: 0 key, 1
        value); for tests and inspection."""
        r = self.rank
        b = (self.dir_B_k, self.dir_B_v)[which][:, task * r:(task + 1) * r]
        return b @ self.lora_A[task * r:(task + 1) * r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stored components' contribution ``[0; sum_k a_k^K D_k^K x; sum_k a_k^V D_k^V x]`` (3d wide)."""
        n = self.count * self.rank
        h = F.linear(x, self.lora_A[:n])
        scale = self.magnitude[:self.count].repeat_interleave(self.rank, dim=0)  # (n, 2)
        b_full = torch.cat([torch.zeros_like(self.dir_B_k[:, :n]), self.dir_B_k[:, :n] * scale[:, 0],
                            self.dir_B_v[:, :n] * scale[:, 1]], dim=0)
        return F.linear(h, b_full.to(h.dtype))

    def extra_repr(self) -> str:
        return f"count={self.count}, max_tasks={self.max_tasks}, rank={self.rank}, dim={self.dim}"


def attach(layer: nn.Module, components: SDLoRAComponents) -> torch.utils.hooks.RemovableHandle:
    """Add ``components``' output to ``layer``'s (a k/v-adapted qkv projection) with a forward hook; a layer
    without stored components computes as before."""
    def hook(module, inputs, output):
        return output + components(inputs[0]) if components.count else output
    return layer.register_forward_hook(hook)
