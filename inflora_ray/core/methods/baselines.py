"""The baselines that need no module of their own: the linear probe (heads only), sequential LoRA (random
``A_t``, no projection), joint training (the upper bound: full fine-tuning on the tasks seen so far) and its
LoRA variant."""
from __future__ import annotations

from typing import Optional

import torch

from ...config import MethodConfig
from ..model import ContinualViT
from ..subspace import random_lora_A
from .registry import CovarianceFn, Method, register_method


@register_method
class LinearProbe(Method):
    """Heads only: the backbone never changes (no adapters)."""
    name = "linear-probe"


@register_method
class SeqLoRA(Method):
    """Plain sequential LoRA: random (Kaiming-uniform) A_t and zero B_t, both trained, no projection."""
    name = "seq-lora"
    uses_adapters = True

    def prepare_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        with torch.no_grad():
            for i, layer in enumerate(model.adapters):
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + task) * 10_007 + i)
                layer.lora_A.copy_(random_lora_A(layer.rank, layer.in_features, gen))
                layer.lora_B_k.zero_()
                layer.lora_B_v.zero_()
        self.set_task_trainable(model)
        return {}

    def set_task_trainable(self, model: ContinualViT) -> None:
        for layer in model.adapters:
            layer.set_trainable(a=True, b=True)

    def trainable_parameters(self, model: ContinualViT) -> list[torch.nn.Parameter]:
        return [p for layer in model.adapters for p in layer.adapter_params().values()]


def _reinit_heads(model: ContinualViT, task: int, seed: int) -> None:
    """Give heads 0..task-1 the loop's own first initialisation again (ContinualViT.add_head with each task's
    generator), so that the joint model of tasks 0..task starts from untrained heads."""
    with torch.no_grad():
        for j, head in enumerate(model.heads[:task]):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + j)
            bound = 1.0 / model.embed_dim ** 0.5
            for p in (head.weight, head.bias):
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


def backbone_weights(model: ContinualViT) -> dict[str, torch.Tensor]:
    """A CPU copy of every backbone parameter, by name."""
    return {k: p.detach().cpu().clone() for k, p in model.backbone.named_parameters()}


@register_method
class Joint(Method):
    """Joint training, the upper bound: at task t the backbone is reset to the pre-trained weights and fine-tuned
    in full (every backbone parameter), with all heads 0..t re-initialised, on the union of tasks 0..t's
    training data; the model after task t is the model trained jointly on everything seen so far. No adapters.

    The method keeps a reference to the model it was built for: its checkpoint state carries the backbone's
    current weights (after a task, or mid-task with the optimizer state the loop saves)."""
    name = "joint"
    trains_backbone = True

    def __init__(self, cfg: MethodConfig, num_tasks: int, seed: int):
        super().__init__(cfg, num_tasks, seed)
        self.model: Optional[ContinualViT] = None
        self.pretrained: dict[str, torch.Tensor] = {}  # the backbone as built (pre-trained), on the CPU

    def build(self, model: ContinualViT) -> None:
        # Called before a checkpoint is restored, so the backbone still holds the pre-trained weights.
        self.model = model
        self.pretrained = backbone_weights(model)

    def training_tasks(self, task: int) -> list[int]:
        return list(range(task + 1))

    def prepare_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        _reinit_heads(model, task, self.seed)
        with torch.no_grad():
            for k, p in model.backbone.named_parameters():
                p.copy_(self.pretrained[k])
        self.set_task_trainable(model)
        return {}

    def set_task_trainable(self, model: ContinualViT) -> None:
        model.backbone.requires_grad_(True)

    def trainable_parameters(self, model: ContinualViT) -> list[torch.nn.Parameter]:
        return list(model.backbone.parameters())

    def finish_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        model.backbone.requires_grad_(False)
        return {}

    def state_dict(self) -> dict:
        if self.model is None:
            raise RuntimeError("joint: state_dict() before build(): the method has no model to save")
        return {**super().state_dict(), "backbone": backbone_weights(self.model)}

    def load_state_dict(self, state: dict, model: ContinualViT) -> None:
        super().load_state_dict(state, model)
        with torch.no_grad():
            for k, p in model.backbone.named_parameters():
                p.copy_(state["backbone"][k])


@register_method
class JointLoRA(SeqLoRA):
    """Joint training with a LoRA adapter: at task t a fresh k/v LoRA adapter (random A, zero B, both trained,
    as seq-lora) on the pre-trained backbone and all heads 0..t, re-initialised, train on the union of tasks
    0..t's training data. The adapter is not merged (the next task starts again from the pre-trained weights).
    A ceiling for what one adapter of ``method.rank`` can reach, not for the backbone (that is ``joint``)."""
    name = "joint-lora"

    def __init__(self, cfg: MethodConfig, num_tasks: int, seed: int):
        super().__init__(cfg, num_tasks, seed)
        self.adapter: list[dict[str, torch.Tensor]] = []  # the finished joint model's adapter

    def training_tasks(self, task: int) -> list[int]:
        return list(range(task + 1))

    def prepare_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        _reinit_heads(model, task, self.seed)
        return super().prepare_task(model, task, covariance)

    def finish_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        self.adapter = [{k: v.detach().cpu().clone() for k, v in layer.adapter_params().items()}
                        for layer in model.adapters]
        for layer in model.adapters:
            layer.set_trainable(a=False, b=False)
        return {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "adapter": self.adapter}

    def load_state_dict(self, state: dict, model: ContinualViT) -> None:
        super().load_state_dict(state, model)
        self.adapter = state["adapter"]
        with torch.no_grad():
            for layer, tensors in zip(model.adapters, self.adapter):
                for k, v in tensors.items():
                    getattr(layer, k).copy_(v)
