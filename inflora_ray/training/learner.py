"""One worker's continual loop: design A_t -> train -> update memory/merge -> evaluate -> checkpoint.

Runs the same in a plain process and inside a Ray Train worker: every cross-worker step goes through
:mod:`inflora_ray.training.collective`, which is the identity without a process group.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import collective
from ..config import Config, TrainConfig
from ..data import Benchmark, build_benchmark
from ..data.blocks import BlockCache, BlockSet
from ..data.device_pipeline import DevicePipeline, resolve_pipeline
from ..data.loader import (PassLoader, TaskDataset, global_batch_sizes, pass_batches, train_batches, worker_block)
from ..logs import log_event
from ..core.methods import Method, build_method
from ..core.metrics import AccuracyCounts, summary
from ..core.model import ContinualViT, build_model
from ..core.subspace import CovariancePass, covariance_sums
from .checkpoint import LearnerState, checkpoint_problems, learner_architecture
from .optim import lr_factor, make_optimizer
from .precision import Precision
from .runtime import peak_memory_mb, resolve_device, rng_state, seed_everything, set_rng_state
from .state import TaskProgress, TaskResult, with_task_mean
from .step import largest_rank_share, train_step

log = logging.getLogger(__name__)

class Hooks:
    """Callbacks a driver (Ray Train worker, test) plugs into the loop; all are no-ops here."""

    def on_step(self, learner: "ContinualLearner", task: int, epoch: int, step: int) -> None:
        """Before each optimisation step (fault injection in tests)."""

    def on_epoch_end(self, learner: "ContinualLearner", task: int, epoch: int) -> None:
        """After each training epoch of a task (mid-task checkpoints)."""

    def on_task_end(self, learner: "ContinualLearner", result: TaskResult) -> None:
        """After a task is trained, merged and evaluated (task checkpoints, results to the driver)."""


class _Features(nn.Module):
    """The method's features and auxiliary loss of a batch with padding rows (``valid``): what
    ``train.compile`` compiles, the part of the training forward whose shapes are the same in every task."""

    def __init__(self, model: ContinualViT, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, images: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.method.features(self.model, images, valid)


def _compile_features(model: ContinualViT, method: Method, train: TrainConfig) -> nn.Module:
    """:class:`_Features` under ``torch.compile`` with static shapes, ``train.compile_backend`` and
    ``train.compile_mode`` (docs/performance.md#compiled-training-step)."""
    inductor = train.compile_backend == "inductor"
    mode = train.compile_mode if inductor and train.compile_mode != "default" else None
    return torch.compile(_Features(model, method), backend=train.compile_backend, mode=mode, dynamic=False)


class _CurrentTask(nn.Module):
    """Forward through the method's features and the trained heads only (what training optimises): the
    current task's head, or heads ``head_indices`` concatenated (joint). Returns ``(logits, aux loss)``.

    ``compiled`` (``train.compile``): the features come from :func:`_compile_features`, always on exactly
    ``static_batch`` rows, the largest share of a step that this rank gets in the run. A shorter batch (the
    last of an epoch, a rank's smaller share) is padded with zero images marked as padding for the method
    (they add nothing to its auxiliary loss), and their features are dropped before the heads. The heads run
    outside the compiled graph, so neither how many heads the model has nor their widths (classes per task,
    several heads concatenated in joint training) enter it: one graph serves every step of every task.
    Methods whose forward depends on per-task state of their own (their number of finished tasks, the task
    being trained) still get one graph per task; ``recompile_limit`` keeps those from falling back to eager
    after Dynamo's default limit of 8."""

    def __init__(self, model: ContinualViT, method: Method, head_indices: list[int],
                 compiled: Optional[nn.Module] = None, static_batch: int = 0, recompile_limit: int = 8):
        super().__init__()
        self.model = model
        self.method = method
        self.head_indices = head_indices
        self.compiled = compiled
        self.static_batch = static_batch
        self.recompile_limit = recompile_limit

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.compiled is None:
            feats, aux = self.method.features(self.model, images)
        else:
            feats, aux = self._padded_features(images)
        heads = [self.model.heads[i] for i in self.head_indices]
        logits = heads[0](feats) if len(heads) == 1 else torch.cat([h(feats) for h in heads], dim=1)
        return logits, aux

    def _padded_features(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        n, size = len(images), self.static_batch
        if n > size:
            raise ValueError(f"a compiled step got {n} samples, more than its static batch of {size}")
        valid = (torch.arange(size, device=images.device) < n).to(torch.float32)
        if n < size:
            images = torch.cat([images, images.new_zeros((size - n, *images.shape[1:]))])
        with torch._dynamo.config.patch(recompile_limit=self.recompile_limit):
            feats, aux = self.compiled(images, valid)
        return feats[:n], aux


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
            # TF32 for fp32 work outside autocast in training and evaluation; covariance passes turn it off.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed_everything(cfg.experiment.seed)
        self.benchmark = benchmark or build_benchmark(cfg.data, cfg.model.img_size, model=cfg.model)
        self.method: Method = build_method(cfg.method, self.benchmark.num_tasks, cfg.experiment.seed,
                                           agree=collective.agree_with_rank0)
        self.model = build_model(cfg.model, self.method.adapter_rank())
        self.method.build(self.model)  # the method's own modules, before the move to the device
        self.model = self.model.to(self.device)
        self.precision = Precision.for_device(cfg.train.precision, self.device)
        label_map = self.benchmark.label_map()
        self.train_set = TaskDataset(self.benchmark.train, self.benchmark.preprocess, label_map)
        self.test_set = TaskDataset(self.benchmark.test, self.benchmark.preprocess, label_map)
        # This worker's blocks of the tasks, read from the store once each and kept on local disk.
        self.blocks = BlockCache(cfg.data.block_cache_dir, cfg.data.block_cache_mb << 20)
        self._train_pass: Optional[PassLoader] = None  # the current task's training block, while it runs
        self._train_pass_task = -1
        # data.pipeline=device: the training data's epochs and covariance passes go through a per-task uint8
        # cache with augmentation on the device; evaluation keeps the CPU path.
        self.use_device_pipeline = resolve_pipeline(cfg.data.pipeline, self.device) == "device"
        self.counts = AccuracyCounts()
        self.own_head_counts = AccuracyCounts()
        self.task_results: list[TaskResult] = []
        self.next_task = 0
        self.in_progress: Optional[TaskProgress] = None  # the task being trained (restored mid-task on resume)

    # ------------------------------------------------------------------ helpers
    def _pass_loader(self, dataset: TaskDataset, indices) -> PassLoader:
        """A loader over this worker's block of ``indices`` (a task's samples), staged from the store once."""
        source = self.blocks.stage(dataset.source, worker_block(indices, self.rank, self.world_size))
        if source is not dataset.source:
            dataset = TaskDataset(source, dataset.preprocess, dataset.label_map)
        return PassLoader(dataset, loader_workers=self.cfg.data.loader_workers,
                          pin_memory=self.device.type == "cuda")

    def _train_loader(self, task: int):
        """The loader of task ``task``'s training block (``.run(batches)``): the one open while the task runs,
        else a new one; with the device pipeline, a per-task uint8 cache on the device over the staged block."""
        if self._train_pass is None or self._train_pass_task != task:
            self._close_train_loader()
            loader = self._pass_loader(self.train_set, self._training_indices(task))
            if self.use_device_pipeline:  # the pass loader's processes never start: the pipeline decodes
                loader.close()
                loader = _DeviceLoader(DevicePipeline(loader.dataset, self.device, self.cfg.data.device_cache_mb << 20,
                                                      self.cfg.data.loader_workers, self.cfg.data.device_cache_side))
            self._train_pass = loader
            self._train_pass_task = task
        return self._train_pass

    def _training_indices(self, task: int):
        """The samples that train task ``task``: its own, or the union of the method's training tasks (joint)."""
        return _union_indices([self.benchmark.task_indices("train", j) for j in self.method.training_tasks(task)])

    def _close_train_loader(self) -> None:
        if self._train_pass is not None:
            self._train_pass.close()
            self._train_pass = None

    def _images(self, loader):
        for images, _ in loader:
            if len(images):  # pass_batches gives no empty batch; never hand the model one anyway
                yield images.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ covariance
    def covariance(self, task: int, which: CovariancePass) -> list[torch.Tensor]:
        """Each adapted layer's input covariance ``C = sum x x^T / n`` on task ``task``'s training data
        (training augmentation of pass ``which``), summed over all workers' blocks before dividing. The pass
        runs in full fp32 whatever ``train.precision`` is (see :func:`covariance_sums`)."""
        indices = self.benchmark.task_indices("train", task)
        batches = pass_batches(indices, self.cfg.data.eval_batch_size, self.rank, self.world_size,
                               seed=self.cfg.experiment.seed, task=task, aug_stream=int(which))
        t0 = time.perf_counter()
        sums, counts = covariance_sums(self.model, self.model.adapters,
                                       self._images(self._train_loader(task).run(batches)),
                                       forward=self.model.features)
        collective.all_reduce_sum(sums + [counts])
        log_event(log, "covariance_pass", task=task, which=which.name.lower(), tokens=int(counts[0].item()),
                  seconds=round(time.perf_counter() - t0, 3))
        return [s / counts[i].to(s.dtype) for i, s in enumerate(sums)]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, upto_task: int) -> tuple[list[int], list[int], list[int]]:
        """Class-incremental evaluation on the test sets of tasks 0..upto_task (each worker evaluates its block).

        Returns per task: correct (argmax over all seen classes), total, and correct on the task's own head.
        """
        self.model.eval()
        n_heads = upto_task + 1
        counts = torch.zeros(3, n_heads, dtype=torch.float64, device=self.device)
        indices = [self.benchmark.task_indices("test", j) for j in range(n_heads)]
        # Each task's test block staged once (and kept for later evaluations while the cache has room); one
        # loader, whose processes start once, serves the passes over all of them.
        blocks = [self.blocks.stage(self.test_set.source, worker_block(idx, self.rank, self.world_size))
                  for idx in indices]
        dataset = TaskDataset(BlockSet(blocks), self.test_set.preprocess, self.test_set.label_map)
        with PassLoader(dataset, loader_workers=self.cfg.data.loader_workers,
                        pin_memory=self.device.type == "cuda") as loader, self.precision.frozen_weights(
                            self.model.backbone):
            for j in range(n_heads):
                lo = self.benchmark.task_offset(j)
                hi = lo + len(self.benchmark.tasks[j])
                batches = pass_batches(indices[j], self.cfg.data.eval_batch_size, self.rank, self.world_size)
                for images, labels in loader.run(batches):
                    if not len(labels):  # pass_batches gives no empty batch; never hand the model one anyway
                        continue
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                    with self.precision.autocast():
                        feats, _ = self.method.features(self.model, images)
                        logits = self.model.logits(feats, n_heads).float()
                    counts[0, j] += (logits.argmax(1) == labels).sum()
                    counts[1, j] += labels.numel()
                    counts[2, j] += (logits[:, lo:hi].argmax(1) == labels - lo).sum()
        collective.all_reduce_sum([counts])
        c = counts.cpu().long().tolist()
        return c[0], c[1], c[2]

    # ------------------------------------------------------------------ training
    def _train_task(self, task: int, head: nn.Linear, progress: TaskProgress, started: float) -> None:
        """Train the current task's adapter and head from ``progress.epochs_done`` to the last epoch
        (``started``: the task's start on this process's ``perf_counter`` clock, earlier processes included).
        With several training tasks (joint) the union of their training data trains all their heads."""
        cfg = self.cfg
        tasks = self.method.training_tasks(task)
        heads = [self.model.heads[j] for j in tasks]
        optimizer = make_optimizer(cfg.train, self.method.trainable_parameters(self.model),
                                   head if tasks == [task] else heads)
        if progress.optimizer is not None:
            optimizer.load_state_dict(progress.optimizer)
        scaler = self.precision.scaler()  # fp16 only; its state is checkpointed with the optimizer's
        if progress.scaler is not None and scaler.is_enabled():
            scaler.load_state_dict(progress.scaler)
        # Not wrapped in DDP: train_step all-reduces the gradients itself, so that a rank without a sample in
        # a step can skip the forward and still join the step's one collective (DDP cannot skip a forward).
        module = _CurrentTask(self.model, self.method, tasks)
        if cfg.train.compile:  # one graph for the whole run (a resumed run's new process compiles it once more)
            num_tasks = self.benchmark.num_tasks
            static = largest_rank_share([len(self._training_indices(t)) for t in range(num_tasks)],
                                        cfg.data.batch_size, cfg.experiment.seed, cfg.train.epochs, self.world_size)
            # At most one graph per task even for methods with per-task state; room for a second learner.
            module = _CurrentTask(self.model, self.method, tasks, _compile_features(self.model, self.method, cfg.train),
                                  static, recompile_limit=max(8, 2 * num_tasks))
        offset = self.benchmark.task_offset(tasks[0])
        indices = self._training_indices(task)
        sizes = global_batch_sizes(len(indices), cfg.data.batch_size)
        self.model.eval()  # backbone in eval mode while training (no dropout), as in the paper
        for epoch in range(progress.epochs_done, cfg.train.epochs):
            factor = lr_factor(cfg.train, epoch)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            batches = train_batches(indices, cfg.data.batch_size, cfg.experiment.seed, task, epoch,
                                    self.rank, self.world_size)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            for step, (images, labels) in enumerate(self._train_loader(task).run(batches)):
                self.hooks.on_step(self, task, epoch, step)
                images = images.to(self.device, non_blocking=True)
                targets = labels.to(self.device, non_blocking=True) - offset
                batch_loss = train_step(module, images, targets, sizes[step], optimizer, scaler,
                                        self.precision.autocast, cfg.train.grad_clip)
                loss_sum += batch_loss
                if (step + 1) % cfg.experiment.log_every_steps == 0:
                    log_event(log, "train_step", task=task, epoch=epoch, step=step + 1, steps=len(batches),
                              loss=round(float(batch_loss) / max(1, labels.numel()), 5))
            seconds = time.perf_counter() - t0
            collective.all_reduce_sum([loss_sum])  # batch sizes are already global
            epoch_loss = float(loss_sum) / max(1, sum(sizes))
            progress.losses.append(epoch_loss)
            progress.train_seconds += seconds
            progress.train_images += sum(sizes)
            progress.epochs_done = epoch + 1
            progress.optimizer = optimizer.state_dict()
            progress.scaler = scaler.state_dict() if scaler.is_enabled() else None
            progress.elapsed = time.perf_counter() - started
            log_event(log, "epoch_end", task=task, epoch=epoch, epochs=cfg.train.epochs,
                      lr=round(optimizer.param_groups[0]["lr"], 8), loss=round(epoch_loss, 5),
                      images_per_second=round(sum(sizes) / max(seconds, 1e-9), 1), seconds=round(seconds, 2))
            self.hooks.on_epoch_end(self, task, epoch)

    def _begin_task(self, task: int, covariance) -> tuple[nn.Linear, TaskProgress]:
        """The task's head and progress: restored when resuming mid-task, else a new head and the method's
        preparation of the adapter (design of A_t for InfLoRA)."""
        progress = self.in_progress
        if progress is not None and progress.task == task:
            log_event(log, "task_resume", task=task, epochs_done=progress.epochs_done)
            return self.model.heads[task], progress
        classes = self.benchmark.tasks[task]
        log_event(log, "task_start", task=task, tasks=self.benchmark.num_tasks, classes=classes,
                  train_samples=len(self.benchmark.task_indices("train", task)))
        gen = torch.Generator().manual_seed(self.cfg.experiment.seed * 1_000_003 + task)
        head = self.model.add_head(len(classes), generator=gen)
        info = self.method.prepare_task(self.model, task, covariance)
        self.in_progress = TaskProgress(task=task, info=info)
        return head, self.in_progress

    def run_task(self, task: int) -> TaskResult:
        """Design (or resume) task ``task``, train it, finish it, evaluate on all seen tasks."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        covariance = lambda which: self.covariance(task, which)  # noqa: E731
        trained_heads = []
        try:  # the task's training block is staged once and its loader processes serve every pass over it
            head, progress = self._begin_task(task, covariance)
            started = time.perf_counter() - progress.elapsed
            trained_heads = [self.model.heads[j] for j in self.method.training_tasks(task)]
            for h in trained_heads:
                h.requires_grad_(True)
            with self.precision.frozen_weights(self.model.backbone):
                self._train_task(task, head, progress, started)
            info = dict(progress.info)
            info.update(self.method.finish_task(self.model, task, covariance))
        finally:
            for h in trained_heads:
                h.requires_grad_(False)
            self._close_train_loader()
        correct, total, own = self.evaluate(task)
        self.counts.add_row(correct, total)
        self.own_head_counts.add_row(own, total)
        m = summary(self.counts)
        result = TaskResult(
            task=task, classes=self.benchmark.tasks[task], correct=correct, total=total, own_head_correct=own,
            accuracy=m["accuracy_matrix"][-1], own_head_accuracy=self.own_head_counts.matrix()[-1],
            pooled_accuracy=m["pooled_accuracy"][-1], task_mean_accuracy=m["task_mean_accuracy"][-1],
            average_incremental_accuracy=m["average_incremental_accuracy"],
            average_incremental_accuracy_task_mean=m["average_incremental_accuracy_task_mean"],
            forgetting=m["forgetting"], backward_transfer=m["backward_transfer"],
            train_loss=progress.losses[-1] if progress.losses else float("nan"),
            task_seconds=time.perf_counter() - started, train_seconds=progress.train_seconds,
            train_images=progress.train_images,
            images_per_second=progress.train_images / max(progress.train_seconds, 1e-9),
            peak_memory_mb=peak_memory_mb(self.device), info=info)
        self.task_results.append(result)
        self.next_task = task + 1
        self.in_progress = None
        log_event(log, "task_end", task=task, pooled_accuracy=round(result.pooled_accuracy, 4),
                  task_mean_accuracy=round(result.task_mean_accuracy, 4),
                  average_incremental_accuracy=round(result.average_incremental_accuracy, 4),
                  average_incremental_accuracy_task_mean=round(result.average_incremental_accuracy_task_mean, 4),
                  accuracy=[round(a, 4) for a in result.accuracy], seconds=round(result.task_seconds, 2),
                  images_per_second=round(result.images_per_second, 1))
        self.hooks.on_task_end(self, result)
        return result

    def run(self, stop_after_task: Optional[int] = None) -> list[TaskResult]:
        """Run the remaining tasks (up to and including ``stop_after_task`` when given)."""
        last = self.benchmark.num_tasks - 1 if stop_after_task is None else min(stop_after_task,
                                                                                self.benchmark.num_tasks - 1)
        while self.next_task <= last:
            self.run_task(self.next_task)
        return self.task_results

    @property
    def finished(self) -> bool:
        return self.next_task >= self.benchmark.num_tasks

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Everything needed to continue (:class:`~.checkpoint.LearnerState`): heads, method (memory, finished
        adapters), the current task's adapter and optimizer when mid-task, accuracy counts, RNG states, the
        config."""
        in_task = None
        if self.in_progress is not None:
            in_task = self.in_progress.to_dict()  # a deep copy
            in_task["adapters"] = [{k: v.detach().cpu().clone() for k, v in layer.adapter_params().items()}
                                   for layer in self.model.adapters]
        return LearnerState(
            config=self.cfg.to_dict(), next_task=self.next_task,
            heads=[{k: v.detach().cpu().clone() for k, v in h.state_dict().items()} for h in self.model.heads],
            method=self.method.state_dict(),
            extras={k: v.detach().cpu().clone() for k, v in self.model.extras.state_dict().items()},
            counts=self.counts.to_dict(), own_head_counts=self.own_head_counts.to_dict(),
            task_results=[r.to_dict() for r in self.task_results], in_task=in_task,
            class_order=list(self.benchmark.class_order), rng=rng_state()).to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore a freshly built learner (same config) to a checkpointed point; ``state`` must fit it
        (:func:`~.checkpoint.checkpoint_problems` says why not)."""
        problems = checkpoint_problems(state, learner_architecture(self))
        if problems:
            raise ValueError("the checkpoint does not fit this learner: " + "; ".join(problems))
        saved = LearnerState.from_dict(state)
        self.method.load_state_dict(saved.method, self.model)
        if saved.extras:
            self.model.extras.load_state_dict(saved.extras)
        for h in saved.heads:
            head = self.model.add_head(int(h["weight"].shape[0]))
            head.load_state_dict(h)
            head.requires_grad_(False)
        self.counts = AccuracyCounts.from_dict(saved.counts)
        self.own_head_counts = AccuracyCounts.from_dict(saved.own_head_counts)
        self.task_results = [TaskResult(**r) for r in with_task_mean(saved.task_results)]
        self.next_task = int(saved.next_task)
        self.in_progress = None if saved.in_task is None else TaskProgress.from_dict(saved.in_task)
        if self.in_progress is not None:
            with torch.no_grad():
                for layer, tensors in zip(self.model.adapters, self.in_progress.adapters):
                    for k, v in tensors.items():
                        layer.adapter_params()[k].copy_(v)
            self.in_progress.adapters = None
            self.method.set_task_trainable(self.model)
        if saved.rng:
            set_rng_state(saved.rng)


class _DeviceLoader:
    """A :class:`DevicePipeline` behind the ``run(batches)`` / ``close()`` of a :class:`PassLoader`."""

    def __init__(self, pipeline: DevicePipeline):
        self.pipeline = pipeline

    def run(self, batches):
        return self.pipeline.loader(batches)

    def close(self) -> None:
        self.pipeline = None


def _union_indices(parts: list) -> "np.ndarray":
    """The training indices of several tasks, concatenated in task order (each sample once)."""
    return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts])
