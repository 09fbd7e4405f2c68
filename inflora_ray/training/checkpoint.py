"""The checkpoint format, in one place: what a checkpoint directory holds, how it is written and read, what the
learner state in it contains, and whether a state fits a config.

A checkpoint directory (named by :func:`inflora_ray.rundir.checkpoint_name`) holds two files:

- ``state.pt``: the learner state (:class:`LearnerState`) saved with ``torch.save``; it is read with
  ``weights_only=True``, so nothing but tensors and plain containers is ever unpickled;
- ``meta.json``: the metrics reported with the checkpoint and the SHA-256 of ``state.pt`` (``state_sha256``),
  checked before ``state.pt`` is read.

Before a state is loaded into a learner, :func:`checkpoint_problems` compares it with the :class:`Architecture`
the config builds (method, adapted layers, rank, width, the backbone's shapes where the method trains it,
task heads, class order), so that a checkpoint made for another config is refused with a message, never loaded
half-way.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import torch

from .. import storage
from ..config import Config
from ..core.lora import ADAPTER_PARAM_NAMES
from ..core.methods import METHODS, Method
from ..core.model import meta_backbone
from ..data.base import resolve_class_order, split_tasks
from ..data.registry import get_benchmark

STATE_FILE = "state.pt"
META_FILE = "meta.json"
STATE_DIGEST_KEY = "state_sha256"  # in meta.json: the SHA-256 of state.pt
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, cut short, altered, holding objects other than tensors, or
    made for another architecture; the message names it and says what is wrong."""


@dataclass
class LearnerState:
    """What ``state.pt`` holds: everything a learner needs to continue, as tensors and plain containers."""
    config: dict  # the config that made it (Config.to_dict)
    next_task: int  # the first task not finished
    heads: list[dict]  # each finished (or started) task's head: {"weight", "bias"}
    method: dict  # the method's own state (Method.state_dict: name, finished adapters, memory, ...)
    extras: dict  # the method's modules on the model (model.extras state dict)
    counts: dict  # the accuracy counts so far (AccuracyCounts.to_dict)
    own_head_counts: dict  # the same, each task on its own head
    task_results: list[dict]  # each finished task's TaskResult.to_dict
    in_task: Optional[dict]  # the task being trained (TaskProgress.to_dict, with its adapters), or None
    class_order: list[int]
    rng: dict  # the random generators' states
    version: int = CHECKPOINT_VERSION

    def to_dict(self) -> dict:
        """The state as ``torch.save`` stores it (the field values themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict) -> "LearnerState":
        """A state read from ``state.pt`` (checked by :func:`checkpoint_problems` first)."""
        return cls(**{f.name: state[f.name] for f in fields(cls)})


def _missing_keys(state: dict) -> list[str]:
    return [f.name for f in fields(LearnerState) if f.name not in state]


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------

def write_checkpoint(directory: str, state: dict, meta: dict) -> None:
    """Save ``state`` as ``state.pt`` and ``meta`` with the SHA-256 of ``state.pt`` as ``meta.json``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    storage.write_bytes(storage.join(directory, STATE_FILE), data)
    storage.write_json(storage.join(directory, META_FILE), {**meta, STATE_DIGEST_KEY: hashlib.sha256(data).hexdigest()})


def recorded_state_digest(directory: str) -> str:
    """The SHA-256 of ``state.pt`` recorded in the checkpoint's ``meta.json``; :class:`CheckpointError` when
    ``meta.json`` is missing, damaged or records none."""
    meta_path = storage.join(directory, META_FILE)
    if not storage.exists(meta_path):
        raise CheckpointError(f"{meta_path} is missing: the checkpoint cannot be verified")
    try:
        meta = storage.read_json(meta_path)
    except ValueError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}); the checkpoint is damaged") from None
    digest = meta.get(STATE_DIGEST_KEY) if isinstance(meta, dict) else None
    if not isinstance(digest, str):
        raise CheckpointError(f"{meta_path}: {STATE_DIGEST_KEY} is {digest!r}, not a hex digest; the checkpoint "
                              "cannot be verified (damaged, or not an inflora-ray checkpoint)")
    return digest


def load_state_bytes(data: bytes, shown: str) -> dict:
    """A learner state from ``torch.save`` bytes, unpickling nothing but tensors and plain containers
    (``weights_only=True``); ``shown`` names the file in errors."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise CheckpointError(f"{shown}: refused: it holds objects other than tensors and plain containers, "
                              f"which are never unpickled ({first})") from None
    except Exception as e:  # cut short, empty, not a torch file: RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(f"{shown}: cannot be read as a torch.save file ({type(e).__name__}: "
                              f"{str(e)[:160]}); it is truncated or not an inflora-ray checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{shown}: holds a {type(state).__name__}, not an inflora-ray learner state")
    return state


def read_checkpoint(directory: str, name: Optional[str] = None) -> dict:
    """The learner state in checkpoint ``directory`` after checking ``state.pt`` against the SHA-256 in
    ``meta.json``. ``name``: how errors name the checkpoint (default ``directory``). Raises
    :class:`CheckpointError`; ``OSError`` when the storage cannot be read."""
    state_path = storage.join(directory, STATE_FILE)
    shown = storage.join(name or directory, STATE_FILE)
    if not storage.exists(state_path):
        raise CheckpointError(f"{name or directory}: no inflora-ray checkpoint there ({STATE_FILE} missing)")
    expected = recorded_state_digest(directory)
    data = storage.read_bytes(state_path)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{shown}: SHA-256 {actual} differs from {expected} recorded in {META_FILE}; the "
                              "file was cut short or altered after it was written")
    return load_state_bytes(data, shown)


# ------------------------------------------------------------------------------------------------------------
# Does a state fit a config?
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """What a learner state must match to load into a learner: the method, its adapted layers, the task
    heads and the class order."""
    method: str
    layers: int  # adapted layers (0: the method has no adapters)
    rank: Optional[int]  # adapter rank (None: no adapters)
    width: int  # input width of the adapted layers and of the heads (the ViT's embed_dim)
    task_sizes: list[int]  # number of classes of each task, in task order
    class_order: list[int]
    # name -> shape of each backbone parameter, for a method that trains the backbone (joint); else empty
    backbone: dict = field(default_factory=dict)


def config_architecture(cfg: Config, class_order: Optional[Sequence[int]] = None) -> Architecture:
    """The architecture ``cfg`` builds (the model on the meta device, no weights). The class order is
    ``class_order`` (the built benchmark's) when given, else the one ``cfg.data`` resolves to for the
    benchmark's registered number of classes (no data is read). Raises ``ValueError`` for a model or class
    order the config cannot build."""
    model = meta_backbone(cfg.model)
    adapted = METHODS[cfg.method.name].uses_adapters
    try:
        if class_order is None:
            class_order = resolve_class_order(get_benchmark(cfg.data.benchmark).num_classes, cfg.data.class_order,
                                              cfg.data.class_order_seed)
        tasks = split_tasks(class_order, cfg.data.num_tasks)
    except ValueError as e:
        raise ValueError(f"data: {e}") from None
    return Architecture(method=cfg.method.name, layers=len(model.blocks) if adapted else 0,
                        rank=cfg.method.rank if adapted else None, width=int(model.embed_dim),
                        task_sizes=[len(t) for t in tasks], class_order=[int(c) for c in class_order],
                        backbone=_backbone_shapes(model) if METHODS[cfg.method.name].trains_backbone else {})


def learner_architecture(learner: Any) -> Architecture:
    """The architecture of a built :class:`~inflora_ray.training.learner.ContinualLearner`."""
    return Architecture(method=learner.method.name, layers=len(learner.model.adapters),
                        rank=learner.method.adapter_rank(), width=learner.model.embed_dim,
                        task_sizes=[len(t) for t in learner.benchmark.tasks],
                        class_order=[int(c) for c in learner.benchmark.class_order],
                        backbone=_backbone_shapes(learner.model.backbone) if learner.method.trains_backbone else {})


def _backbone_shapes(backbone: torch.nn.Module) -> dict:
    """name -> shape of each parameter of a backbone (also of one on the meta device)."""
    return {k: tuple(p.shape) for k, p in backbone.named_parameters()}


def checkpoint_problems(state: dict, arch: Architecture) -> list[str]:
    """Why the learner state ``state`` cannot load into a learner of ``arch`` (empty when it fits)."""
    missing = _missing_keys(state)
    if missing:
        return [f"not an inflora-ray learner state (no {', '.join(missing)})"]
    if state["version"] != CHECKPOINT_VERSION:
        return [f"checkpoint version {state['version']!r} is not supported (this version reads "
                f"{CHECKPOINT_VERSION})"]
    method = Method.stored_name(state["method"])
    if method != arch.method:
        return [f"it was made by method {method!r}, the config says method.name={arch.method!r}"]
    return [*_adapter_problems(state, arch), *_backbone_problems(state, arch), *_head_problems(state, arch),
            *_order_problems(state, arch)]


def _shape(x) -> Optional[tuple]:
    """The shape of a tensor, None for anything else."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _adapter_sets(state: dict) -> list[tuple[str, list]]:
    """(what, per-layer adapter tensors) of every finished task, and of the task in progress if any."""
    sets = [(f"task {t}", layers) for t, layers in enumerate(Method.stored_adapters(state["method"]))]
    in_task = state["in_task"]
    if isinstance(in_task, dict) and in_task.get("adapters") is not None:
        sets.append(("the task in progress", in_task["adapters"]))
    return sets


def _adapter_problems(state: dict, arch: Architecture) -> list[str]:
    """The adapters' layer count, rank and width against the config's."""
    lora_a, *lora_b = ADAPTER_PARAM_NAMES
    want = {lora_a: (arch.rank, arch.width), **{name: (arch.width, arch.rank) for name in lora_b}}
    for what, layers in _adapter_sets(state):
        if not isinstance(layers, list) or len(layers) != arch.layers:
            count = len(layers) if isinstance(layers, list) else type(layers).__name__
            return [f"the adapters of {what} cover {count} layers, the config's model has {arch.layers} "
                    "adapted layers"]
        for i, layer in enumerate(layers):
            shapes = {k: _shape(v) for k, v in layer.items()} if isinstance(layer, dict) else {}
            if shapes != want:
                rank, width = shapes.get(lora_a) or (None, None)
                return [f"the adapter of {what}, layer {i} has rank {rank} and input width {width} "
                        f"({shapes}), the config has method.rank={arch.rank} and a model of width {arch.width}"]
    return []


def _backbone_problems(state: dict, arch: Architecture) -> list[str]:
    """For a method that trains the backbone: the stored backbone weights against the config's backbone (the
    same parameter names, each of the same shape)."""
    if not arch.backbone:
        return []
    stored = state["method"].get("backbone") if isinstance(state["method"], dict) else None
    if not isinstance(stored, dict):
        return [f"method {arch.method!r} trains the backbone, but the checkpoint holds no backbone weights (a "
                "checkpoint of the LoRA joint, which is method.name=joint-lora now?)"]
    shapes = {k: _shape(v) for k, v in stored.items()}
    if shapes.keys() != arch.backbone.keys():
        missing, extra = sorted(arch.backbone.keys() - shapes.keys()), sorted(shapes.keys() - arch.backbone.keys())
        return [f"its backbone weights do not match the config's model: missing {missing[:3]}, unexpected "
                f"{extra[:3]} (model.name, model.kwargs)"]
    for k, shape in arch.backbone.items():
        if shapes[k] != shape:
            return [f"its backbone weight {k!r} has shape {shapes[k]}, the config's model has {shape} "
                    "(model.name, model.kwargs)"]
    return []


def _head_problems(state: dict, arch: Architecture) -> list[str]:
    """The number of task heads and their shapes against the config's tasks and width."""
    heads, num_tasks = state["heads"], len(arch.task_sizes)
    if not isinstance(heads, list) or len(heads) > num_tasks:
        count = len(heads) if isinstance(heads, list) else type(heads).__name__
        return [f"it has {count} task heads, the config has data.num_tasks={num_tasks}"]
    problems = []
    next_task = state["next_task"]
    if not isinstance(next_task, int) or not 0 <= next_task <= num_tasks:
        problems.append(f"its next task {next_task!r} is not in 0..{num_tasks} (data.num_tasks={num_tasks})")
    for t, (head, size) in enumerate(zip(heads, arch.task_sizes)):
        shape = _shape(head.get("weight")) if isinstance(head, dict) else None
        if shape != (size, arch.width):
            problems.append(f"the head of task {t} has shape {shape}, the config's task {t} has {size} classes "
                            f"and a model of width {arch.width} (data.num_tasks, model.kwargs)")
            break
    return problems


def _brief(order: Sequence) -> str:
    """A class order for a message: at most its first 12 entries."""
    head = ", ".join(str(c) for c in list(order)[:12])
    return f"[{head}{', ...' if len(order) > 12 else ''}] ({len(order)} classes)"


def _order_problems(state: dict, arch: Architecture) -> list[str]:
    """The checkpoint's class order against the config's."""
    order = state["class_order"]
    if not isinstance(order, (list, tuple)) or [c for c in order if not isinstance(c, int)]:
        return [f"its class order is not a list of class indices ({type(order).__name__})"]
    if list(order) != arch.class_order:
        return [f"its class order {_brief(order)} differs from the config's {_brief(arch.class_order)} "
                "(data.benchmark, data.class_order, data.class_order_seed)"]
    return []

