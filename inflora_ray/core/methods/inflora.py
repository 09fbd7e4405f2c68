"""InfLoRA (Liang & Li, CVPR 2024) as a method: before each task, ``A_t`` is designed from the task's input
covariance with the DualGPM memory's subspace projected out (:func:`~inflora_ray.core.subspace.design_lora_A`)
and frozen; only ``B_t`` trains; after the task, the memory takes in the task's input space and the branch is
merged into ``W``. The math itself is in :mod:`inflora_ray.core.subspace` and :mod:`inflora_ray.core.lora`."""
from __future__ import annotations

import torch

from ...config import MethodConfig
from ..model import ContinualViT
from ..subspace import CovariancePass, LayerMemory, design_lora_A, threshold_schedule
from .registry import CovarianceFn, Method, register_method


@register_method
class InfLoRA(Method):
    """InfLoRA: A_t designed from the task's input covariance outside the DualGPM memory, frozen; B_t trained."""
    name = "inflora"
    uses_adapters = True

    def __init__(self, cfg: MethodConfig, num_tasks: int, seed: int):
        super().__init__(cfg, num_tasks, seed)
        self.memory: list[LayerMemory] = []

    def _ensure_memory(self, model: ContinualViT) -> None:
        if not self.memory:
            self.memory = [LayerMemory(dim=layer.in_features, representation=self.cfg.memory_representation)
                           for layer in model.adapters]

    def prepare_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        self._ensure_memory(model)
        covs = covariance(CovariancePass.BEFORE_TASK)
        designs = [design_lora_A(cov, mem, layer.rank)
                   for layer, cov, mem in zip(model.adapters, covs, self.memory)]
        n = len(designs)
        agreed = self.agree([f"A_t of task {task}, adapted layer {i}" for i in range(n)]
                            + [f"used rank of task {task}"],
                            [d.lora_A for d in designs] + [torch.tensor([d.used_rank for d in designs])])
        with torch.no_grad():
            for layer, lora_A in zip(model.adapters, agreed[:n]):
                layer.lora_A.copy_(lora_A.to(layer.lora_A.device, layer.lora_A.dtype))
                layer.lora_B_k.zero_()
                layer.lora_B_v.zero_()
        self.set_task_trainable(model)
        return {"used_rank": [int(u) for u in agreed[n]]}

    def set_task_trainable(self, model: ContinualViT) -> None:
        for layer in model.adapters:
            layer.set_trainable(a=False, b=True)

    def trainable_parameters(self, model: ContinualViT) -> list[torch.nn.Parameter]:
        return [p for layer in model.adapters for p in (layer.lora_B_k, layer.lora_B_v)]

    def finish_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        self._ensure_memory(model)
        covs = covariance(CovariancePass.AFTER_TASK)
        eps = threshold_schedule(self.cfg.lamb, self.cfg.lame, task, self.num_tasks)
        for cov, mem in zip(covs, self.memory):
            mem.update(cov, eps)
        self._agree_memory(task)
        info = super().finish_task(model, task, covariance)
        info.update(threshold=eps, memory_dims=self.memory_dims(), memory_modes=[m.mode for m in self.memory])
        return info

    def _agree_memory(self, task: int) -> None:
        """Every rank keeps rank 0's memory (basis and representation) after the update of task ``task``."""
        n = len(self.memory)
        agreed = self.agree([f"memory basis after task {task}, adapted layer {i}" for i in range(n)]
                            + [f"memory representation after task {task}"],
                            [m.basis for m in self.memory]
                            + [torch.tensor([m.mode == "retain" for m in self.memory], dtype=torch.int64)])
        for m, basis, retain in zip(self.memory, agreed[:n], agreed[n].tolist()):
            m.basis, m.mode = basis, ("retain" if retain else "remove")

    def memory_dims(self) -> list[int]:
        """Dimension of the protected space per adapted layer."""
        return [m.protected_dim for m in self.memory]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["memory"] = [m.state_dict() for m in self.memory]
        return state

    def load_state_dict(self, state: dict, model: ContinualViT) -> None:
        super().load_state_dict(state, model)
        self.memory = [LayerMemory.from_state_dict(m) for m in state["memory"]]
