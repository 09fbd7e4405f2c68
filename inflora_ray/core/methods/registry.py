"""The method registry: the :class:`Method` interface every continual-learning strategy implements, and the
table of methods by name, filled by :func:`register_method` as each method's module is imported (importing
:mod:`inflora_ray.core.methods` imports them all). This module imports no method.

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
from typing import Callable, Optional, TypeVar

import torch

from ...config import METHOD_NAMES, MethodConfig
from ..model import ContinualViT
from ..subspace import CovariancePass

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
    # True for a method that trains the backbone itself (joint): its state carries the backbone's weights under
    # "backbone", checked against the config's backbone before a checkpoint is loaded.
    trains_backbone = False

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

    def features(self, model: ContinualViT, images: torch.Tensor, valid: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (B, embed_dim) features the heads read, and an auxiliary loss summed over the batch's samples
        (a scalar) or None. Used in training and evaluation (evaluation ignores the auxiliary loss).

        ``valid``: None (every row is a sample), or a float ``(B,)`` tensor, 1 for a sample and 0 for a padding
        row (a compiled training step pads a short batch to its one static size). Each row's features must
        depend on that row only; padding rows must add nothing to the auxiliary loss nor to anything the
        method derives from the batch as a whole."""
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
                layer.set_trainable(a=False, b=False)
        return {}

    def state_dict(self) -> dict:
        """The method's part of a checkpoint: its name, the finished tasks' adapters, and what a subclass adds."""
        return {"name": self.name, "history": self.history}

    @staticmethod
    def stored_name(state: object) -> Optional[str]:
        """The method name in a checkpoint's method state (None when it has none): read before anything is
        loaded, to check that a checkpoint fits a config."""
        return state.get("name") if isinstance(state, dict) else None

    @staticmethod
    def stored_adapters(state: dict) -> list:
        """The finished tasks' adapters (per task, per layer, ``{name: tensor}``) in a method state."""
        return state.get("history") or []

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



M = TypeVar("M", bound=type[Method])

# The methods by name (inflora_ray.config.METHOD_NAMES), filled as their modules are imported.
METHODS: dict[str, type[Method]] = {}


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` the method named ``cls.name``. The name must be one the config accepts
    (:data:`~inflora_ray.config.METHOD_NAMES`) and not taken."""
    if cls.name not in METHOD_NAMES:
        raise ValueError(f"method {cls.name!r} ({cls.__qualname__}) is not in inflora_ray.config.METHOD_NAMES; "
                         "add it there so that configs accept it")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice ({METHODS[cls.name].__qualname__}, "
                         f"{cls.__qualname__})")
    METHODS[cls.name] = cls
    return cls


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
