"""The Ray Train worker: each worker runs :class:`ContinualLearner` as one data-parallel rank; checkpoints and
per-task metrics go through ``ray.train.report``; rank 0 also writes each task's results into the run
directory.

An error that a restart cannot fix (see :data:`FATAL_AT_SETUP`, :data:`FATAL_WHILE_TRAINING`) is recorded in
the run's fatal marker (:mod:`.errors`) and never reaches Ray Train's retries, which would otherwise repeat
it up to ``run.max_failures`` times, or forever (:func:`train_worker`)."""
from __future__ import annotations

import io
import logging
import math
import tempfile
from typing import Optional

import ray.train
import torch
from ray.train import Checkpoint

from .. import storage
from ..config import Config, ConfigError, config_from_dict
from ..core.metrics import AccuracyRecord, summary
from ..data.base import DataError
from ..logs import log_event, setup_logging
from ..provenance import accelerator
from ..rundir import CheckpointError, RunDir, checkpoint_name, read_checkpoint, write_checkpoint
from ..training import collective
from ..training.learner import ContinualLearner, Hooks
from ..training.state import TaskReport, task_metrics
from .errors import NonRetryableError, fatal_errors_recorded, read_fatal, write_fatal
from .faults import FaultPlan
from .preflight import Architecture, checkpoint_problems

log = logging.getLogger(__name__)

# Errors that come back on every attempt. While setting up (config, benchmark, model, checkpoint) any bad
# value is one (ConfigError, DataError and CheckpointError are ValueErrors); storage and device errors
# (OSError, RuntimeError) may be transient and stay retryable. While training, only the explicit kinds.
FATAL_AT_SETUP: tuple[type[BaseException], ...] = (NonRetryableError, ValueError, KeyError, TypeError)
FATAL_WHILE_TRAINING: tuple[type[BaseException], ...] = (NonRetryableError, ConfigError, DataError, CheckpointError)


def load_checkpoint_state(checkpoint: Checkpoint) -> dict:
    """The learner state stored in a checkpoint (downloaded first if remote), verified against the SHA-256
    in its ``meta.json`` and unpickling only tensors (:func:`read_checkpoint`; :class:`CheckpointError`)."""
    with checkpoint.as_directory() as d:
        return read_checkpoint(d, name=str(checkpoint.path))


def learner_architecture(learner: ContinualLearner) -> Architecture:
    """The architecture of a built learner, which a checkpoint must match to load into it."""
    return Architecture(method=learner.method.name, layers=len(learner.model.adapters),
                        rank=learner.method.adapter_rank(), width=learner.model.embed_dim,
                        task_sizes=[len(t) for t in learner.benchmark.tasks],
                        class_order=[int(c) for c in learner.benchmark.class_order])


def restore(learner: ContinualLearner, checkpoint: Checkpoint, state: dict, origin: str, run: RunDir) -> None:
    """Load ``state`` (read from ``checkpoint``) into ``learner`` after checking that it fits
    (:class:`CheckpointError` naming the checkpoint); a branched run's rank 0 also writes the results of the
    tasks it inherited."""
    problems = checkpoint_problems(state, learner_architecture(learner))
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint.path} ({origin}) does not fit the config: "
                              + "; ".join(problems))
    learner.load_state_dict(state)
    if learner.rank == 0:
        for t in range(learner.next_task):
            if not storage.exists(run.task_result(t)):
                write_task_record(run, learner, t)
    log_event(log, "restored", origin=origin, checkpoint=str(checkpoint.path), next_task=learner.next_task,
              mid_task=learner.in_progress is not None, rank=learner.rank, world_size=learner.world_size)


def write_task_record(run: RunDir, learner: ContinualLearner, task: int) -> None:
    """Write ``results/task_<t>.json`` (the task's report and the metrics as they stood after it) and the
    task's finished adapter."""
    rows = task + 1
    record = AccuracyRecord(correct=learner.record.correct[:rows], total=learner.record.total[:rows])
    own = AccuracyRecord(correct=learner.own_head_record.correct[:rows], total=learner.own_head_record.total[:rows])
    if task < len(learner.method.history):  # the task's finished adapter (A, B_k, B_v per layer)
        buf = io.BytesIO()
        torch.save(learner.method.history[task], buf)
        storage.write_bytes(run.adapters(task), buf.getvalue())
    storage.write_json(run.task_result(task), {
        "report": learner.reports[task].to_dict(), "summary": summary(record),
        "own_head_accuracy_matrix": own.matrix(), "world_size": learner.world_size,
        "accelerator": accelerator()})  # rank 0's GPU (the driver's may be a CPU-only head)


# Reported with every checkpoint; Ray Train keeps the checkpoints that score highest (see launch.py): every
# task-boundary checkpoint scores above every mid-task one, and later mid-task ones above earlier ones.
RETENTION_SCORE = "checkpoint_retention_score"


def retention_score(task: int, epoch: Optional[int] = None) -> int:
    """The retention score of the checkpoint after task ``task`` (or after epoch ``epoch`` of it)."""
    return 10**12 + task if epoch is None else task * 10**6 + epoch


class RayHooks(Hooks):
    """Report and checkpoint through Ray Train; fire a test's injected fault when planned."""

    def __init__(self, cfg: Config, run: RunDir, fault: Optional[FaultPlan] = None):
        self.cfg = cfg
        self.run = run
        self.fault = fault
        self.rank = collective.rank()

    def on_step(self, learner, task, epoch, step):
        if self.fault is not None:
            self.fault.fire_if_due(self.run.fault_marker, task, epoch, step, self.rank)

    def on_epoch_end(self, learner, task, epoch):
        k = self.cfg.run.checkpoint_every_epochs
        if k and (epoch + 1) % k == 0 and epoch + 1 < self.cfg.train.epochs:
            self._report(learner, {"task": task, "epoch": epoch, "kind": "epoch",
                                   RETENTION_SCORE: retention_score(task, epoch)}, checkpoint_name(task, epoch))

    def on_task_end(self, learner, report: TaskReport):
        metrics = {"task": report.task, "tasks_done": report.task + 1, "num_tasks": learner.benchmark.num_tasks,
                   **task_metrics(report.to_dict(), finite_only=False)}
        if self.rank == 0:
            write_task_record(self.run, learner, report.task)
        self._report(learner, {**metrics, "kind": "task", RETENTION_SCORE: retention_score(report.task)},
                     checkpoint_name(report.task))

    def _report(self, learner, metrics: dict, name: str) -> None:
        # Every worker holds the same state; rank 0 writes it, the others report without a checkpoint.
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(d, learner.state_dict(),
                             {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)


def setup_worker(loop_config: dict, run: RunDir) -> ContinualLearner:
    """The learner of this rank: config, device, benchmark, model, and the checkpoint to continue from (this
    run's latest, else ``start_from``; read and verified before the learner is built)."""
    cfg = config_from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    fault = FaultPlan.parse(loop_config["fault"]) if loop_config.get("fault") else None
    checkpoint = ray.train.get_checkpoint()
    origin = "latest checkpoint of this run"
    if checkpoint is None and loop_config.get("start_from"):
        checkpoint, origin = Checkpoint(path=loop_config["start_from"]), "--start-from"
    state = load_checkpoint_state(checkpoint) if checkpoint is not None else None
    benchmark = None
    if loop_config.get("data") is not None:  # the driver's scan of the dataset: not listed or hashed again here
        from ..data import build_benchmark

        benchmark = build_benchmark(cfg.data, cfg.model.img_size, model=cfg.model,
                                    scanned=ray.get(loop_config["data"]))
    learner = ContinualLearner(cfg, device=device, benchmark=benchmark, hooks=RayHooks(cfg, run, fault))
    if checkpoint is not None:
        restore(learner, checkpoint, state, origin, run)
    log_event(log, "worker_start", rank=learner.rank, world_size=learner.world_size, device=str(device),
              threads=torch.get_num_threads())
    return learner


def setup_or_none(loop_config: dict, run: RunDir) -> Optional[ContinualLearner]:
    """:func:`setup_worker`, or None after an error a restart cannot fix (:data:`FATAL_AT_SETUP`), which is
    recorded in the run's fatal marker; other errors propagate (Ray Train retries them)."""
    try:
        return setup_worker(loop_config, run)
    except FATAL_AT_SETUP as e:
        write_fatal(run, e, phase="setup", rank=collective.rank())
        log_event(log, "fatal_setup_error", level=logging.ERROR, rank=collective.rank(), error=type(e).__name__,
                  message=str(e), marker=run.fatal_marker)
        return None


def all_ranks_ready(ready: bool) -> bool:
    """True when every rank is ready (one all-reduce of a flag, on the backend's device; no-op alone)."""
    if not collective.is_distributed():
        return ready
    import torch.distributed as dist

    on_gpu = dist.get_backend() == "nccl"
    flag = torch.tensor([0.0 if ready else 1.0],
                        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    collective.all_reduce_sum([flag])
    return float(flag.item()) == 0.0


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point of one worker (a data-parallel rank). ``loop_config``: ``config`` (a Config as a
    dict), ``run_dir``, ``stop_after_task``, ``start_from`` (a checkpoint directory) and ``fault`` (tests only).

    An error that a restart cannot fix is recorded in the run's fatal marker. During setup, every rank then
    returns without training, so Ray Train sees no failure and retries nothing; during training it
    propagates, and a restarted attempt finds the marker and returns at once. Whichever way a rank gets there
    (its own error, or the marker written by another rank or an earlier attempt), every rank joins the same
    single agreement before training, so none is left waiting in a collective."""
    setup_logging()
    run = RunDir(loop_config["run_dir"])
    fatal = read_fatal(run)
    learner = None
    if fatal is not None:
        log_event(log, "fatal_marker_found", level=logging.ERROR, rank=collective.rank(), marker=run.fatal_marker,
                  error=fatal.get("type"), message=fatal.get("message"))
    else:
        learner = setup_or_none(loop_config, run)
    if not all_ranks_ready(learner is not None):
        log_event(log, "stopped_before_training", rank=collective.rank(), marker=run.fatal_marker)
        return
    with fatal_errors_recorded(run, FATAL_WHILE_TRAINING, phase="training", rank=learner.rank):
        learner.run(stop_after_task=loop_config.get("stop_after_task"))
