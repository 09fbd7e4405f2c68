"""InfLoRA and the baselines as small strategy objects around the task loop.

A method registers its own modules on the model (``build``), computes the features the heads read
(``features``, with an optional auxiliary loss), names whose training data trains a task
(``training_tasks``), decides how the current task's adapter is set up before training (``prepare_task``), which
parameters train besides the head (``trainable_parameters``), and what happens after training
(``finish_task``: memory update, merge). ``covariance(tag)`` is supplied by the loop and returns each adapted
layer's input covariance on the current task's training data (already reduced over workers).

Results each rank computes itself from the same reduced data (an SVD of a covariance, a memory update) go
through ``Method.agree`` before they are used: the loop sets it to a function that returns rank 0's values
on every rank, so that ranks whose linear algebra differs in the last bits (mixed node types) still hold the
same ``A_t`` and memory. Without workers it is the identity. Any method with such results should use it.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import nn

from ..config import MethodConfig
from .model import ContinualViT
from .sd_lora import SDLoRAComponents, attach
from .subspace import CovariancePass, LayerMemory, design_lora_A, random_lora_A, threshold_schedule

log = logging.getLogger(__name__)

CovarianceFn = Callable[[CovariancePass], list[torch.Tensor]]
# agree(names, tensors) -> the tensors every rank must use (rank 0's); names say what each tensor is.
AgreeFn = Callable[[list[str], list[torch.Tensor]], list[torch.Tensor]]


def agree_locally(names: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The single-process ``agree``: the tensors themselves."""
    return tensors


class Method:
    """Base strategy: what every method shares (heads are trained by the loop; adapters, if any, are merged
    into W after each task). Subclasses set ``name`` and ``uses_adapters`` and override the hooks."""
    name = ""
    uses_adapters = False

    def __init__(self, cfg: MethodConfig, num_tasks: int, seed: int):
        self.cfg = cfg
        self.num_tasks = num_tasks
        self.seed = seed
        # Set by the loop (build_method(agree=...)): makes per-rank results equal on every rank.
        self.agree: AgreeFn = agree_locally
        # Finished tasks' adapters (A, B_k, B_v per layer), replayed into W when a checkpoint is restored.
        self.history: list[list[dict[str, torch.Tensor]]] = []

    def adapter_rank(self) -> Optional[int]:
        """Rank of the adapters to build, or None for none."""
        return self.cfg.rank if self.uses_adapters else None

    def build(self, model: ContinualViT) -> None:
        """Register the method's own modules under ``model.extras`` (called once, right after the model is
        built, before it moves to the device and before a checkpoint is restored)."""

    def features(self, model: ContinualViT, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (B, embed_dim) features the heads read, and an auxiliary loss summed over the batch's samples
        (a scalar) or None. Used in training and evaluation (evaluation ignores the auxiliary loss)."""
        return model.features(images), None

    def training_tasks(self, task: int) -> list[int]:
        """The tasks whose training data (and heads) train task ``task``: consecutive, ending at ``task``."""
        return [task]

    def prepare_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        """Set up the current task's adapter before training; returns figures worth logging."""
        return {}

    def set_task_trainable(self, model: ContinualViT) -> None:
        """Mark the current task's adapter parameters trainable (also used when resuming mid-task)."""

    def trainable_parameters(self, model: ContinualViT) -> list[torch.nn.Parameter]:
        """Adapter parameters trained on the current task (heads are handled by the loop)."""
        return []

    def finish_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        """After training: update any memory, merge the task's adapter into W; returns figures to log."""
        if self.uses_adapters:
            self.history.append([{k: v.detach().cpu().clone() for k, v in layer.adapter_params().items()}
                                 for layer in model.adapters])
            for layer in model.adapters:
                layer.merge_and_reset()
                _set_trainable(layer, a=False, b=False)
        return {}

    def state_dict(self) -> dict:
        return {"name": self.name, "history": self.history}

    def load_state_dict(self, state: dict, model: ContinualViT) -> None:
        """Restore the method and replay finished tasks' merges into a freshly built model."""
        if state["name"] != self.name:
            raise ValueError(f"checkpoint was made by method {state['name']!r}, config says {self.name!r}")
        self.history = state["history"]
        with torch.no_grad():
            for task_adapters in self.history:
                for layer, tensors in zip(model.adapters, task_adapters):
                    for k, v in tensors.items():
                        getattr(layer, k).copy_(v)
                    layer.merge_and_reset()


class LinearProbe(Method):
    """Heads only: the backbone never changes (no adapters)."""
    name = "linear-probe"


def _set_trainable(layer, a: bool, b: bool) -> None:
    layer.lora_A.requires_grad_(a)
    layer.lora_B_k.requires_grad_(b)
    layer.lora_B_v.requires_grad_(b)


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
            _set_trainable(layer, a=True, b=True)

    def trainable_parameters(self, model: ContinualViT) -> list[torch.nn.Parameter]:
        return [p for layer in model.adapters for p in layer.adapter_params().values()]


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
            _set_trainable(layer, a=False, b=True)

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


class Joint(SeqLoRA):
    """Joint training, the upper bound: at task t a fresh LoRA adapter (random A, zero B, both trained, as
    seq-lora) on the pre-trained backbone and all heads 0..t, re-initialised, train on the union of tasks
    0..t's training data; the model after task t is the model trained jointly on everything seen so far.
    The adapter is not merged (the next task starts again from the pre-trained weights)."""
    name = "joint"

    def __init__(self, cfg: MethodConfig, num_tasks: int, seed: int):
        super().__init__(cfg, num_tasks, seed)
        self.adapter: list[dict[str, torch.Tensor]] = []  # the finished joint model's adapter

    def training_tasks(self, task: int) -> list[int]:
        return list(range(task + 1))

    def prepare_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        with torch.no_grad():
            for j, head in enumerate(model.heads[:task]):
                # The loop's own initialisation of head j (ContinualViT.add_head with the task's generator).
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
                bound = 1.0 / model.embed_dim ** 0.5
                for p in (head.weight, head.bias):
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
        return super().prepare_task(model, task, covariance)

    def finish_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        self.adapter = [{k: v.detach().cpu().clone() for k, v in layer.adapter_params().items()}
                        for layer in model.adapters]
        for layer in model.adapters:
            _set_trainable(layer, a=False, b=False)
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
                _set_trainable(layer, a=False, b=False)
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


# The prompt-based methods live in their own modules, which subclass Method (hence imported here, below it).
from .coda_prompt import CodaPrompt  # noqa: E402
from .dualprompt import DualPrompt  # noqa: E402
from .l2p import L2P  # noqa: E402

# The registry of methods: config validation and the CLI read the names from here.
METHODS: dict[str, type[Method]] = {m.name: m for m in (InfLoRA, SeqLoRA, LinearProbe, Joint, SDLoRA, L2P, DualPrompt,
                                                        CodaPrompt)}


def build_method(cfg: MethodConfig, num_tasks: int, seed: int, agree: Optional[AgreeFn] = None) -> Method:
    """The strategy object named by ``cfg.name``; ``agree`` (default: the identity) makes results that each
    rank computes itself equal on every rank (see the module docstring)."""
    try:
        method = METHODS[cfg.name](cfg, num_tasks, seed)
    except KeyError:
        raise ValueError(f"method.name={cfg.name!r}; choose one of {sorted(METHODS)}") from None
    if agree is not None:
        method.agree = agree
    return method
