"""One worker's continual loop: design A_t -> train -> update memory/merge -> evaluate -> checkpoint.

Runs the same in a plain process and inside a Ray Train worker: every cross-worker step goes through
:mod:`inflora_ray.training.collective`, which is the identity without a process group.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import collective
from ..config import Config
from ..data import Benchmark, build_benchmark
from ..data.loader import (TaskDataset, global_batch_sizes, make_loader, pass_batches, train_batches)
from ..logs import log_event
from ..core.methods import Method, build_method
from ..core.metrics import AccuracyRecord, summary
from ..core.model import ContinualViT, build_model
from ..core.subspace import covariance_sums

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


def lr_factor(cfg_train, epoch: int) -> float:
    """Per-epoch learning-rate multiplier (the paper's cosine: cos(99 pi e / (200 (K - 1))))."""
    if cfg_train.schedule == "cosine":
        k = cfg_train.epochs
        return 1.0 if k <= 1 else math.cos(99 * math.pi * epoch / (200 * (k - 1)))
    if cfg_train.schedule == "step":
        return cfg_train.step_gamma ** sum(1 for m in cfg_train.step_milestones if epoch >= m)
    return 1.0


def resolve_device(cfg_train, device: Optional[torch.device] = None) -> torch.device:
    """The explicit device, else the configured one ("auto": CUDA when available)."""
    if device is not None:
        return torch.device(device)
    if cfg_train.device == "cuda" or (cfg_train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident set size of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class TaskReport:
    """What one task produced; every worker holds the same (reduced) figures."""
    task: int
    classes: list[int]
    correct: list[int]
    total: list[int]
    own_head_correct: list[int]
    accuracy: list[float]
    own_head_accuracy: list[float]
    pooled_accuracy: float
    average_incremental_accuracy: float
    forgetting: float
    backward_transfer: float
    train_loss: float
    task_seconds: float
    train_seconds: float
    train_images: int
    images_per_second: float
    peak_memory_mb: float
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Hooks:
    """Callbacks a driver (Ray Train worker, test) plugs into the loop; all are no-ops here."""

    def on_step(self, learner: "ContinualLearner", task: int, epoch: int, step: int) -> None:
        """Before each optimisation step (fault injection in tests)."""

    def on_epoch_end(self, learner: "ContinualLearner", task: int, epoch: int) -> None:
        """After each training epoch of a task (mid-task checkpoints)."""

    def on_task_end(self, learner: "ContinualLearner", report: TaskReport) -> None:
        """After a task is trained, merged and evaluated (task checkpoints, reporting)."""


class _CurrentTask(nn.Module):
    """Forward through the backbone and the current task's head only (what training optimises)."""

    def __init__(self, model: ContinualViT, head_index: int):
        super().__init__()
        self.model = model
        self.head_index = head_index

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.heads[self.head_index](self.model.features(images))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """Process RNG states as tensors and plain types (loadable with ``torch.load(weights_only=True)``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_gauss": (int(has_gauss), float(cached)), "python": random.getstate()}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), rng["numpy_pos"],
                         rng["numpy_gauss"][0], rng["numpy_gauss"][1]))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))


class ContinualLearner:
    """The continual loop of one worker. ``run()`` goes through the remaining tasks."""

    def __init__(self, cfg: Config, device: Optional[torch.device] = None, benchmark: Optional[Benchmark] = None,
                 hooks: Optional[Hooks] = None):
        self.cfg = cfg
        self.hooks = hooks or Hooks()
        self.rank = collective.rank()
        self.world_size = collective.world_size()
        self.device = resolve_device(cfg.train, device)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (covariance, SVD inputs) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(cfg.experiment.seed)
        self.benchmark = benchmark or build_benchmark(cfg.data, cfg.model.img_size, model=cfg.model)
        self.method: Method = build_method(cfg.method, self.benchmark.num_tasks, cfg.experiment.seed)
        self.model = build_model(cfg.model, self.method.adapter_rank()).to(self.device)
        self.autocast_dtype = self._autocast_dtype()
        label_map = self.benchmark.label_map()
        self.train_set = TaskDataset(self.benchmark.train, self.benchmark.preprocess, label_map)
        self.test_set = TaskDataset(self.benchmark.test, self.benchmark.preprocess, label_map)
        self.record = AccuracyRecord()
        self.own_head_record = AccuracyRecord()
        self.reports: list[TaskReport] = []
        self.next_task = 0
        # Set when resuming mid-task: {"task", "epochs_done", "optimizer", "losses", ...}.
        self._in_task: Optional[dict] = None

    # ------------------------------------------------------------------ helpers
    def _autocast_dtype(self) -> Optional[torch.dtype]:
        p = self.cfg.train.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loader(self, dataset: TaskDataset, batches):
        return make_loader(dataset, batches, num_workers=self.cfg.data.num_workers,
                           pin_memory=self.device.type == "cuda")

    def _images(self, loader):
        for images, _ in loader:
            yield images.to(self.device, non_blocking=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ covariance
    def covariance(self, task: int, tag: int) -> list[torch.Tensor]:
        """Each adapted layer's input covariance ``C = sum x x^T / n`` on task ``task``'s training data
        (training augmentation, pass tag ``tag``), summed over all workers' shards before dividing."""
        indices = self.benchmark.task_indices("train", task)
        batches = pass_batches(indices, self.cfg.data.eval_batch_size, self.rank, self.world_size,
                               seed=self.cfg.experiment.seed, task=task, epoch=tag)
        t0 = time.perf_counter()
        with self._autocast():
            sums, counts = covariance_sums(self.model, self.model.adapters,
                                           self._images(self._loader(self.train_set, batches)),
                                           forward=self.model.features)
        collective.all_reduce_sum(sums + [counts])
        log_event(log, "covariance_pass", task=task, tag=tag, tokens=int(counts[0].item()),
                  seconds=round(time.perf_counter() - t0, 3))
        return [s / counts[i].to(s.dtype) for i, s in enumerate(sums)]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, upto_task: int) -> tuple[list[int], list[int], list[int]]:
        """Class-incremental evaluation on the test sets of tasks 0..upto_task (sharded over workers).

        Returns per task: correct (argmax over all seen classes), total, and correct on the task's own head.
        """
        self.model.eval()
        n_heads = upto_task + 1
        counts = torch.zeros(3, n_heads, dtype=torch.float64, device=self.device)
        for j in range(n_heads):
            lo = self.benchmark.task_offset(j)
            hi = lo + len(self.benchmark.tasks[j])
            batches = pass_batches(self.benchmark.task_indices("test", j), self.cfg.data.eval_batch_size,
                                   self.rank, self.world_size)
            for images, labels in self._loader(self.test_set, batches):
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with self._autocast():
                    logits = self.model(images, num_heads=n_heads).float()
                counts[0, j] += (logits.argmax(1) == labels).sum()
                counts[1, j] += labels.numel()
                counts[2, j] += (logits[:, lo:hi].argmax(1) == labels - lo).sum()
        collective.all_reduce_sum([counts])
        c = counts.cpu().long().tolist()
        return c[0], c[1], c[2]

    # ------------------------------------------------------------------ training
    def _make_optimizer(self, head: nn.Linear) -> torch.optim.Optimizer:
        t = self.cfg.train
        groups = []
        adapter_params = self.method.trainable_parameters(self.model)
        if adapter_params:
            groups.append({"params": adapter_params, "lr": t.lr, "base_lr": t.lr, "name": "adapters"})
        head_lr = t.head_lr if t.head_lr is not None else t.lr
        groups.append({"params": list(head.parameters()), "lr": head_lr, "base_lr": head_lr, "name": "head"})
        if t.optimizer == "adam":
            return torch.optim.Adam(groups, betas=tuple(t.betas), weight_decay=t.weight_decay)
        return torch.optim.SGD(groups, momentum=t.momentum, weight_decay=t.weight_decay)

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not collective.is_distributed():
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        kwargs = dict(broadcast_buffers=False, gradient_as_bucket_view=True)
        if "init_sync" in inspect.signature(DDP.__init__).parameters:
            kwargs["init_sync"] = False  # every worker already built identical weights from the same seed
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index]
        return DDP(module, **kwargs)

    def _train_task(self, task: int, head: nn.Linear, state: dict) -> None:
        """Train the current task's adapter and head from ``state['epochs_done']`` to the last epoch."""
        cfg = self.cfg
        optimizer = self._make_optimizer(head)
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        module = self._wrap(_CurrentTask(self.model, task))
        if cfg.train.compile:
            module = torch.compile(module)
        offset = self.benchmark.task_offset(task)
        indices = self.benchmark.task_indices("train", task)
        sizes = global_batch_sizes(len(indices), cfg.data.batch_size)
        self.model.eval()  # backbone in eval mode while training (no dropout), as in the paper
        for epoch in range(state["epochs_done"], cfg.train.epochs):
            factor = lr_factor(cfg.train, epoch)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            batches = train_batches(indices, cfg.data.batch_size, cfg.experiment.seed, task, epoch,
                                    self.rank, self.world_size)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            for step, (images, labels) in enumerate(self._loader(self.train_set, batches)):
                self.hooks.on_step(self, task, epoch, step)
                images = images.to(self.device, non_blocking=True)
                targets = labels.to(self.device, non_blocking=True) - offset
                with self._autocast():
                    logits = module(images)
                batch_loss = F.cross_entropy(logits.float(), targets, reduction="sum")
                # Sum over this worker's slice / global batch size, times W because DDP averages over W
                # workers: the synchronised gradient is exactly the global batch's mean gradient.
                loss = batch_loss * (self.world_size / sizes[step])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += batch_loss.detach()
                if (step + 1) % cfg.experiment.log_every_steps == 0:
                    log_event(log, "train_step", task=task, epoch=epoch, step=step + 1, steps=len(batches),
                              loss=round(float(batch_loss) / max(1, labels.numel()), 5))
            seconds = time.perf_counter() - t0
            collective.all_reduce_sum([loss_sum])  # batch sizes are already global
            epoch_loss = float(loss_sum) / max(1, sum(sizes))
            state["losses"].append(epoch_loss)
            state["train_seconds"] += seconds
            state["train_images"] += sum(sizes)
            state["epochs_done"] = epoch + 1
            state["optimizer"] = optimizer.state_dict()
            state["elapsed"] = self._elapsed_base + time.perf_counter() - self._task_t0
            log_event(log, "epoch_end", task=task, epoch=epoch, epochs=cfg.train.epochs,
                      lr=round(optimizer.param_groups[0]["lr"], 8), loss=round(epoch_loss, 5),
                      images_per_second=round(sum(sizes) / max(seconds, 1e-9), 1), seconds=round(seconds, 2))
            self._in_task = state
            self.hooks.on_epoch_end(self, task, epoch)

    def run_task(self, task: int) -> TaskReport:
        """Design (or resume) task ``task``, train it, finish it, evaluate on all seen tasks."""
        cfg = self.cfg
        t_start = self._task_t0 = time.perf_counter()
        classes = self.benchmark.tasks[task]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        covariance = lambda tag: self.covariance(task, tag)  # noqa: E731
        state = self._in_task if (self._in_task and self._in_task["task"] == task) else None
        if state is None:
            log_event(log, "task_start", task=task, tasks=self.benchmark.num_tasks, classes=classes,
                      train_samples=len(self.benchmark.task_indices("train", task)))
            gen = torch.Generator().manual_seed(cfg.experiment.seed * 1_000_003 + task)
            head = self.model.add_head(len(classes), generator=gen)
            info = self.method.prepare_task(self.model, task, covariance)
            state = {"task": task, "epochs_done": 0, "optimizer": None, "losses": [], "train_seconds": 0.0,
                     "train_images": 0, "info": info, "elapsed": 0.0}
            self._in_task = state
        else:
            log_event(log, "task_resume", task=task, epochs_done=state["epochs_done"])
            head = self.model.heads[task]
        self._elapsed_base = state["elapsed"]
        head.requires_grad_(True)
        self._train_task(task, head, state)
        head.requires_grad_(False)
        info = dict(state["info"])
        info.update(self.method.finish_task(self.model, task, covariance))
        correct, total, own = self.evaluate(task)
        self.record.add_row(correct, total)
        self.own_head_record.add_row(own, total)
        m = summary(self.record)
        task_seconds = self._elapsed_base + time.perf_counter() - t_start
        report = TaskReport(
            task=task, classes=classes, correct=correct, total=total, own_head_correct=own,
            accuracy=m["accuracy_matrix"][-1], own_head_accuracy=self.own_head_record.matrix()[-1],
            pooled_accuracy=m["pooled_accuracy"][-1], average_incremental_accuracy=m["average_incremental_accuracy"],
            forgetting=m["forgetting"], backward_transfer=m["backward_transfer"],
            train_loss=state["losses"][-1] if state["losses"] else float("nan"),
            task_seconds=task_seconds, train_seconds=state["train_seconds"], train_images=state["train_images"],
            images_per_second=state["train_images"] / max(state["train_seconds"], 1e-9),
            peak_memory_mb=peak_memory_mb(self.device), info=info)
        self.reports.append(report)
        self.next_task = task + 1
        self._in_task = None
        log_event(log, "task_end", task=task, pooled_accuracy=round(report.pooled_accuracy, 4),
                  average_incremental_accuracy=round(report.average_incremental_accuracy, 4),
                  accuracy=[round(a, 4) for a in report.accuracy], seconds=round(task_seconds, 2),
                  images_per_second=round(report.images_per_second, 1))
        self.hooks.on_task_end(self, report)
        return report

    def run(self, stop_after_task: Optional[int] = None) -> list[TaskReport]:
        """Run the remaining tasks (up to and including ``stop_after_task`` when given)."""
        last = self.benchmark.num_tasks - 1 if stop_after_task is None else min(stop_after_task,
                                                                                self.benchmark.num_tasks - 1)
        while self.next_task <= last:
            self.run_task(self.next_task)
        return self.reports

    @property
    def finished(self) -> bool:
        return self.next_task >= self.benchmark.num_tasks

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Everything needed to continue: heads, method (memory, finished adapters), the current task's
        adapter and optimizer when mid-task, accuracy records, RNG states, the config."""
        in_task = None
        if self._in_task is not None:
            in_task = copy.deepcopy(self._in_task)
            in_task["adapters"] = [{k: getattr(layer, k).detach().cpu().clone()
                                    for k in ("lora_A", "lora_B_k", "lora_B_v")} for layer in self.model.adapters]
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "next_task": self.next_task,
            "heads": [{k: v.detach().cpu().clone() for k, v in h.state_dict().items()} for h in self.model.heads],
            "method": self.method.state_dict(),
            "record": self.record.to_dict(),
            "own_head_record": self.own_head_record.to_dict(),
            "reports": [r.to_dict() for r in self.reports],
            "in_task": in_task,
            "class_order": self.benchmark.class_order,
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a freshly built learner (same config) to a checkpointed point."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')} is not supported "
                             f"(expected {CHECKPOINT_VERSION})")
        if list(state["class_order"]) != list(self.benchmark.class_order):
            raise ValueError("checkpoint class order differs from the config's; resume with the same data config")
        self.method.load_state_dict(state["method"], self.model)
        for h in state["heads"]:
            head = self.model.add_head(int(h["weight"].shape[0]))
            head.load_state_dict(h)
            head.requires_grad_(False)
        self.record = AccuracyRecord.from_dict(state["record"])
        self.own_head_record = AccuracyRecord.from_dict(state["own_head_record"])
        self.reports = [TaskReport(**r) for r in state["reports"]]
        self.next_task = int(state["next_task"])
        self._in_task = state.get("in_task")
        if self._in_task is not None:
            with torch.no_grad():
                for layer, tensors in zip(self.model.adapters, self._in_task.pop("adapters")):
                    for k, v in tensors.items():
                        getattr(layer, k).copy_(v)
            self.method.set_task_trainable(self.model)
        if state.get("rng"):
            _set_rng_state(state["rng"])
