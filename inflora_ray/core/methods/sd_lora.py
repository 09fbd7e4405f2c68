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

from ...config import MethodConfig
from ..model import ContinualViT
from .baselines import SeqLoRA
from .registry import CovarianceFn, register_method


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


@register_method
class SDLoRA(SeqLoRA):
    """SD-LoRA (Wu et al., ICLR 2025): each task trains a new LoRA (random A_t, zero B_t, both trained, as
    seq-lora) on the k/v projections; when it finishes, its update is kept as a fixed, normalised direction
    with a learned magnitude (:mod:`inflora_ray.core.sd_lora`), and later tasks train all earlier
    magnitudes together with their own A_t, B_t. Nothing is merged into W."""
    name = "sd-lora"

    def __init__(self, cfg: MethodConfig, num_tasks: int, seed: int):
        super().__init__(cfg, num_tasks, seed)
        self.num_components = 0  # finished tasks stored as components (the same on every layer)

    def build(self, model: ContinualViT) -> None:
        comps = nn.ModuleList(SDLoRAComponents(self.num_tasks, layer.rank, layer.in_features, layer.dim)
                              for layer in model.adapters)
        model.extras["sd_lora"] = comps
        for layer, c in zip(model.adapters, comps):
            attach(layer, c)

    @staticmethod
    def components(model: ContinualViT) -> list[SDLoRAComponents]:
        """Each adapted layer's stored components."""
        return list(model.extras["sd_lora"])

    def set_task_trainable(self, model: ContinualViT) -> None:
        super().set_task_trainable(model)
        for c in self.components(model):
            c.magnitude.requires_grad_(True)

    def trainable_parameters(self, model: ContinualViT) -> list[torch.nn.Parameter]:
        comps = self.components(model)
        # Task 0 has no stored component: its magnitudes take no part in the forward (plain LoRA).
        return super().trainable_parameters(model) + ([c.magnitude for c in comps] if comps[0].count else [])

    def finish_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        with torch.no_grad():
            for layer, c in zip(model.adapters, self.components(model)):
                c.add(layer.lora_A, layer.lora_B_k, layer.lora_B_v)
                c.magnitude.requires_grad_(False)
                for p in layer.adapter_params().values():
                    p.zero_()
                layer.set_trainable(a=False, b=False)
        self.num_components += 1
        mags = torch.stack([c.magnitude[:task + 1].detach().cpu() for c in self.components(model)])
        return {"magnitude_mean": [round(float(m), 5) for m in mags.mean(dim=(0, 2))]}

    def state_dict(self) -> dict:
        # The directions and magnitudes are model.extras tensors, saved by the loop with the model.
        return {**super().state_dict(), "components": self.num_components}

    def load_state_dict(self, state: dict, model: ContinualViT) -> None:
        super().load_state_dict(state, model)
        self.num_components = int(state["components"])
        if not 0 <= self.num_components <= self.num_tasks:
            raise ValueError(f"checkpoint: sd-lora has {self.num_components} stored tasks, the run has "
                             f"{self.num_tasks} tasks")
        for c in self.components(model):
            c.count = self.num_components
