"""Shared pieces of the benchmark scripts: models, the naive reference-style layer, timing, machine info."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from inflora_ray.config import MethodConfig, ModelConfig, TrainConfig
from inflora_ray.core.methods import build_method
from inflora_ray.core.methods.registry import Method
from inflora_ray.presets import list_presets, load_config
from inflora_ray.core.model import ContinualViT, create_backbone

MODELS = {
    "tiny": lambda: ModelConfig(name="vit_tiny_patch16_224", img_size=16,
                                kwargs={"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}),
    "quickstart": lambda: load_config("quickstart").model,
    "vit-b16": lambda: ModelConfig(name="vit_base_patch16_224", img_size=224),
}
# The training settings the benchmarks' steps use: the ImageNet-R presets' (Adam, lr 5e-4, no clipping), what
# a GPU run trains with. The dataset folder is never read.
TRAIN_PRESET = "imagenet-r-10"


def model_config(name: str) -> ModelConfig:
    cfg = MODELS[name]()
    # Benchmarks measure speed: random weights are as fast as pre-trained ones (and need no download).
    return ModelConfig(name=cfg.name, img_size=cfg.img_size, kwargs=dict(cfg.kwargs))


class NaiveKVLoRA(nn.Module):
    """The naive approach, re-implemented for comparison: every task keeps its own (A_s, B_s) for k and v,
    and every forward rebuilds the dense delta ``sum_s B_s A_s`` (d x d_in each for k and v) and pays a
    full dense matmul with it, so the cost grows with the number of tasks."""

    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__()
        self.weight = nn.Parameter(qkv.weight.detach().clone(), requires_grad=False)
        self.bias = None if qkv.bias is None else nn.Parameter(qkv.bias.detach().clone(), requires_grad=False)
        self.dim, self.in_features, self.rank = qkv.out_features // 3, qkv.in_features, rank
        self.A_k, self.B_k, self.A_v, self.B_v = (nn.ParameterList() for _ in range(4))

    def add_task(self, trainable: bool) -> None:
        dev, dt = self.weight.device, self.weight.dtype
        for plist, shape in ((self.A_k, (self.rank, self.in_features)), (self.A_v, (self.rank, self.in_features))):
            plist.append(nn.Parameter(torch.randn(shape, device=dev, dtype=dt) * 0.01, requires_grad=False))
        for plist in (self.B_k, self.B_v):
            plist.append(nn.Parameter(torch.randn(self.dim, self.rank, device=dev, dtype=dt) * 0.01,
                                      requires_grad=trainable))
        for p in list(self.B_k)[:-1] + list(self.B_v)[:-1]:
            p.requires_grad_(False)

    def forward(self, x):
        qkv = F.linear(x, self.weight, self.bias)
        if len(self.A_k) == 0:
            return qkv
        w_k = torch.stack([b @ a for a, b in zip(self.A_k, self.B_k)]).sum(0)
        w_v = torch.stack([b @ a for a, b in zip(self.A_v, self.B_v)]).sum(0)
        q, k, v = qkv.split(self.dim, dim=-1)
        return torch.cat([q, k + F.linear(x, w_k), v + F.linear(x, w_v)], dim=-1)


def build(name: str, variant: str, tasks: int, rank: int, device: torch.device, classes_per_task: int = 10):
    """A model at task ``tasks`` (1-based): ``ours`` with tasks-1 merged branches + the current one, or
    ``naive`` with ``tasks`` stored branches. Returns (model, trainable params)."""
    torch.manual_seed(0)
    backbone = create_backbone(model_config(name))
    if variant == "ours":
        model = ContinualViT(backbone, rank)
        for _ in range(tasks - 1):
            for layer in model.adapters:
                with torch.no_grad():
                    layer.lora_A.normal_(0, 0.01)
                    layer.lora_B_k.normal_(0, 0.01)
                    layer.lora_B_v.normal_(0, 0.01)
                layer.merge_and_reset()
        for layer in model.adapters:
            with torch.no_grad():
                layer.lora_A.normal_(0, 0.01)
        trainable = [p for layer in model.adapters for p in (layer.lora_B_k, layer.lora_B_v)]
    else:
        for p in backbone.parameters():
            p.requires_grad_(False)
        layers = []
        for block in backbone.blocks:
            layer = NaiveKVLoRA(block.attn.qkv, rank)
            for t in range(tasks):
                layer.add_task(trainable=(t == tasks - 1))
            block.attn.qkv = layer
            layers.append(layer)
        model = ContinualViT(backbone, None)
        trainable = [p for layer in layers for p in (layer.B_k[-1], layer.B_v[-1])]
    for _ in range(tasks):
        model.add_head(classes_per_task).requires_grad_(False)
    trainable += list(model.heads[-1].parameters())
    for p in trainable:
        p.requires_grad_(True)
    return model.to(device).eval(), trainable


def method_config(name: str, variant: str, rank: int) -> MethodConfig:
    """The method section for ``variant`` on model ``name``: on the quickstart model, the method's quickstart
    preset when there is one (prompt layers cut to its 4 blocks); on ViT-B/16 its CIFAR-100 preset (its
    recipe: the papers' settings), else the defaults; ``rank`` for the adapter methods."""
    preset = f"{variant}-quickstart" if name == "quickstart" else f"{variant}-cifar100-10"
    if preset in list_presets():
        # The dataset folder is never read: only the method section is used.
        return load_config(preset, [f"data.root={tempfile.gettempdir()}", f"method.rank={rank}"]).method
    return MethodConfig(name=variant, rank=rank)


def build_variant(name: str, variant: str, tasks: int, rank: int, device: torch.device,
                  classes_per_task: int = 10):
    """A model at task ``tasks`` (1-based) and its training forward: ``ours`` / ``naive`` as :func:`build`,
    or any other method of ``METHODS`` (``sd-lora``, ``joint``, ...) set up through its own hooks, with
    tasks-1 finished tasks (random adapters). Returns (model, trainable params, forward: images -> logits)."""
    if variant in ("ours", "naive"):
        model, trainable = build(name, variant, tasks, rank, device, classes_per_task)
        return model, trainable, lambda images: model.heads[-1](model.features(images))
    torch.manual_seed(0)
    method = build_method(method_config(name, variant, rank), num_tasks=max(tasks, 1), seed=0)
    model = ContinualViT(create_backbone(model_config(name)), method.adapter_rank())
    method.build(model)

    def random_adapters():
        with torch.no_grad():
            for layer in model.adapters:
                for p in layer.adapter_params().values():
                    p.normal_(0, 0.01)
    for t in range(tasks - 1):
        model.add_head(classes_per_task).requires_grad_(False)
        method.prepare_task(model, t, covariance=None)  # methods that need a covariance (inflora): use ours
        random_adapters()
        method.finish_task(model, t, covariance=None)
    model.add_head(classes_per_task)
    method.prepare_task(model, tasks - 1, covariance=None)
    random_adapters()
    method.set_task_trainable(model)
    heads = [model.heads[j] for j in method.training_tasks(tasks - 1)]
    trainable = method.trainable_parameters(model) + [p for h in heads for p in h.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    model = model.to(device).eval()

    def forward(images):
        feats, aux = method.features(model, images)
        logits = torch.cat([h(feats) for h in heads], dim=1)
        return logits if aux is None else (logits, aux)
    return model, trainable, forward


def train_config() -> TrainConfig:
    """The ``train`` section of :data:`TRAIN_PRESET`."""
    return load_config(TRAIN_PRESET, [f"data.root={tempfile.gettempdir()}"]).train


class BenchStep:
    """The training loop's own optimisation step on a model at task ``tasks`` (1-based) of ``variant``
    (``ours`` / ``naive``, :func:`build`), ready to be timed: each call is one
    :func:`inflora_ray.training.step.train_step` of the loop's forward module
    (:class:`inflora_ray.training.learner._CurrentTask`: the method's features and the current task's head
    only, the method's loss) with the loop's optimizer (:func:`~inflora_ray.training.optim.make_optimizer` over
    the method's trainable parameters and the head, ``train`` settings of :data:`TRAIN_PRESET`), gradient
    scaler and autocast of ``precision``, and the frozen backbone weights held in that precision for as long
    as the step is open, as the loop holds them for a task. ``compile``: the module under ``torch.compile``,
    as ``train.compile`` does. Close it (or use ``with``) to put the weights back."""

    def __init__(self, name: str, variant: str, tasks: int, rank: int, device: torch.device, precision,
                 images: torch.Tensor, targets: torch.Tensor, classes_per_task: int = 10,
                 train: Optional[TrainConfig] = None, compile: bool = False):
        from inflora_ray.training.learner import _CurrentTask
        from inflora_ray.training.optim import make_optimizer

        self.model, trainable = build(name, variant, tasks, rank, device, classes_per_task)
        head = self.model.heads[tasks - 1]
        adapters = [p for p in trainable if all(p is not q for q in head.parameters())]
        # InfLoRA's forward and loss are the Method defaults (features, cross-entropy): the naive variant,
        # the same maths with every branch stored, uses them too.
        method = build_method(MethodConfig(name="inflora", rank=rank), num_tasks=max(tasks, 1), seed=0)
        assert type(method).features is Method.features, "the variants' forward is the default features"
        self.train = train or train_config()
        self.module: nn.Module = _CurrentTask(self.model, method, [tasks - 1])
        if compile:
            self.module = _compiled(self.module, self.train, len(targets))
        self.optimizer = make_optimizer(self.train, adapters, head)
        self.precision = precision
        self.scaler = precision.scaler()
        self.images, self.targets = images, targets
        self._held = contextlib.ExitStack()
        # The loop holds the frozen weights in the training precision while it trains a task, so the step
        # reads them in that precision.
        self._held.enter_context(precision.frozen_weights(self.model.backbone))

    def __call__(self) -> torch.Tensor:
        """One step; the summed cross-entropy of the batch (what ``train_step`` returns)."""
        from inflora_ray.training.step import train_step

        return train_step(self.module, self.images, self.targets, len(self.targets), self.optimizer, self.scaler,
                          self.precision.autocast, self.train.grad_clip)

    def close(self) -> None:
        """Put the frozen weights back in fp32."""
        self._held.close()

    def __enter__(self) -> "BenchStep":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def loop_backend(device: torch.device, train: TrainConfig) -> None:
    """The backend settings the training loop makes before it trains (``ContinualLearner.__init__``):
    deterministic algorithms when ``train.deterministic`` (with cuBLAS's workspace setting, read when cuBLAS
    starts, so call this before any CUDA work), and TF32 for fp32 matmuls on a GPU."""
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _compiled(module: nn.Module, train: TrainConfig, batch: int) -> nn.Module:
    """The forward module as ``train.compile`` builds it: the loop's compiled features
    (``learner._compile_features``) at a static batch of ``batch`` rows."""
    from inflora_ray.training import learner

    return learner._CurrentTask(module.model, module.method, module.head_indices,
                                learner._compile_features(module.model, module.method, train), batch)


def free(device: torch.device) -> None:
    """Give back what dropped objects held: Python cycles, the CUDA caching allocator's free blocks; and start
    the allocator's peak anew, so that the next measurement sees only what lives from here on."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_mib(device: torch.device) -> float:
    """The CUDA allocator's bytes in use, MiB (NaN on other devices)."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def peak_mib(device: torch.device) -> float:
    """The CUDA allocator's peak since the last reset, MiB (NaN on other devices)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def measure_alone(keys, build_one: Callable, measure: Callable, device: torch.device) -> dict:
    """``measure(key, thing)`` of each ``thing = build_one(key)``, one at a time: everything earlier is freed
    (:func:`free`) before the next is built, so each measurement (peak memory included) sees its own thing
    alone. ``thing.close()`` runs after its measurement when it has one."""
    out = {}
    for key in keys:
        free(device)
        thing = build_one(key)
        try:
            out[key] = measure(key, thing)
        finally:
            if hasattr(thing, "close"):
                thing.close()
            del thing
            free(device)
    return out


def timeit(fn: Callable[[], None], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput(fn: Callable[[], object], device: torch.device, steps: int = 20, warmup: int = 3) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls run back to back (one synchronisation at the end, as
    the training loop queues its steps), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def machine() -> str:
    """One line describing where the figures were taken."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")
