"""The Ray Train worker: each worker runs :class:`ContinualLearner` as one data-parallel rank; checkpoints and
per-task metrics go to Ray Train (``ray.train.report``); rank 0 also writes each task's result into the run
directory.

An error that a restart cannot fix (see :data:`FATAL_AT_SETUP`, :data:`FATAL_WHILE_TRAINING`) is recorded in
the run's fatal marker (:mod:`.errors`) and never reaches Ray Train's retries, which would otherwise repeat
it up to ``run.max_failures`` times, or forever (:func:`train_worker`)."""
from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from typing import Optional

import ray.train
import torch
from ray.train import Checkpoint

from .. import storage
from ..config import Config, ConfigError, config_from_dict, set_dotted
from ..data.base import DataError
from ..logs import attach_run_log, detach_run_log, log_event, setup_logging
from ..provenance import accelerator
from ..redact import remember_secrets
from ..results import write_progress, write_task_result
from ..rundir import RunDir, checkpoint_name
from ..tracking.store import redact_config
from ..training import collective
from ..training.checkpoint import CheckpointError, checkpoint_problems, learner_architecture, read_checkpoint, \
    write_checkpoint
from ..training.learner import ContinualLearner, Hooks
from ..training.state import TaskResult, task_metrics
from .errors import NonRetryableError, fatal_errors_recorded, read_fatal, write_fatal
from .faults import FaultPlan

log = logging.getLogger(__name__)

# Errors that come back on every attempt. While setting up (config, benchmark, model, checkpoint) any bad
# value is one (ConfigError, DataError and CheckpointError are ValueErrors); storage and device errors
# (OSError, RuntimeError) may be transient and stay retryable. While training, only the explicit kinds: a
# damaged shard is a DataError, a store that kept failing with errors that pass a TransientStorageError (an
# OSError, never recorded as fatal: errors.RETRYABLE), which Ray Train retries up to run.max_failures times.
FATAL_AT_SETUP: tuple[type[BaseException], ...] = (NonRetryableError, ValueError, KeyError, TypeError)
FATAL_WHILE_TRAINING: tuple[type[BaseException], ...] = (NonRetryableError, ConfigError, DataError, CheckpointError)


def load_checkpoint_state(checkpoint: Checkpoint) -> dict:
    """The learner state stored in a checkpoint (downloaded first if remote), verified against the SHA-256
    in its ``meta.json`` and unpickling only tensors (:func:`read_checkpoint`; :class:`CheckpointError`)."""
    with checkpoint.as_directory() as d:
        return read_checkpoint(d, name=str(checkpoint.path))


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
                save_task_result(run, learner, t)
    log_event(log, "restored", origin=origin, checkpoint=str(checkpoint.path), next_task=learner.next_task,
              mid_task=learner.in_progress is not None, rank=learner.rank, world_size=learner.world_size)


def save_task_result(run: RunDir, learner: ContinualLearner, task: int) -> None:
    """Write task ``task``'s result file and finished adapter (:func:`~inflora_ray.results.write_task_result`)."""
    history = learner.method.history
    write_task_result(run, learner.task_results[task].to_dict(), learner.counts, learner.own_head_counts,
                      adapters=history[task] if task < len(history) else None, world_size=learner.world_size,
                      accelerator=accelerator())  # rank 0's GPU (the driver's may be a CPU-only head)


# Reported with every checkpoint; Ray Train keeps the checkpoints that score highest (see launch.py): every
# task-boundary checkpoint scores above every mid-task one, and later mid-task ones above earlier ones.
RETENTION_SCORE = "checkpoint_retention_score"


def retention_score(task: int, epoch: Optional[int] = None) -> int:
    """The retention score of the checkpoint after task ``task`` (or after epoch ``epoch`` of it)."""
    return 10**12 + task if epoch is None else task * 10**6 + epoch


class RayHooks(Hooks):
    """Checkpoints and per-task metrics to Ray Train; a test's injected fault fired when planned."""

    def __init__(self, cfg: Config, run: RunDir, fault: Optional[FaultPlan] = None):
        self.cfg = cfg
        self.run = run
        self.fault = fault
        self.rank = collective.rank()

    def on_step(self, learner, task, epoch, step):
        if self.fault is not None:
            self.fault.fire_if_due(self.run.fault_marker, task, epoch, step, self.rank)

    def on_epoch_end(self, learner, task, epoch):
        if self.rank == 0:
            write_progress(self.run, learner.in_progress, self.cfg.train.epochs)
        k = self.cfg.run.checkpoint_every_epochs
        if k and (epoch + 1) % k == 0 and epoch + 1 < self.cfg.train.epochs:
            self._checkpoint(learner, {"task": task, "epoch": epoch, "kind": "epoch",
                                       RETENTION_SCORE: retention_score(task, epoch)}, checkpoint_name(task, epoch))

    def on_task_end(self, learner, result: TaskResult):
        metrics = {"task": result.task, "tasks_done": result.task + 1, "num_tasks": learner.benchmark.num_tasks,
                   **task_metrics(result.to_dict(), finite_only=False)}
        if self.rank == 0:
            save_task_result(self.run, learner, result.task)
        self._checkpoint(learner, {**metrics, "kind": "task", RETENTION_SCORE: retention_score(result.task)},
                         checkpoint_name(result.task))

    def _checkpoint(self, learner, metrics: dict, name: str) -> None:
        """Hand Ray Train the metrics and (rank 0) a checkpoint of the learner, in the directory ``name``."""
        # Every worker holds the same state; rank 0 writes it, the others report without a checkpoint.
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        # The checkpoint is stored with the run: its config without credentials (a --start-from gives them again).
        state = {**learner.state_dict(), "config": redact_config(learner.cfg).to_dict()}
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(d, state,
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
        # Opened as the driver opened it: through an S3 endpoint's variables, with a URI's credentials (which then
        # stay out of the checkpoint's path, shown in messages).
        path, fs = storage.ray_storage(loop_config["start_from"])
        checkpoint, origin = Checkpoint(path=path, filesystem=fs), "--start-from"
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


def with_private_inputs(loop_config: dict) -> dict:
    """``loop_config`` with the values that hold credentials (``private``, a Ray object the driver put: the
    storage and data settings, the run folder, the ``--start-from`` checkpoint; see
    :func:`~.launch.worker_config`) put back in place of their redacted forms; those credentials are kept out
    of this process's messages and logs (:func:`~inflora_ray.redact.remember_secrets`)."""
    ref = loop_config.get("private")
    if ref is None:
        return loop_config
    private = ray.get(ref)
    config = copy.deepcopy(loop_config["config"])
    for key, value in private.get("config", {}).items():
        set_dotted(config, key, value)
    remember_secrets(*private.get("config", {}).values(), private.get("run_dir"), private.get("start_from"))
    return {**loop_config, "config": config, "run_dir": private.get("run_dir", loop_config["run_dir"]),
            "start_from": private.get("start_from", loop_config.get("start_from")), "private": None}


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point of one worker (a data-parallel rank). ``loop_config``: ``config`` (a Config as a
    dict), ``run_dir``, ``stop_after_task``, ``start_from`` (a checkpoint directory) and ``fault`` (tests only).

    An error that a restart cannot fix is recorded in the run's fatal marker. During setup, every rank then
    returns without training, so Ray Train sees no failure and retries nothing; during training it
    propagates, and a restarted attempt finds the marker and returns at once. Whichever way a rank gets there
    (its own error, or the marker written by another rank or an earlier attempt), every rank joins the same
    single agreement before training, so none is left waiting in a collective."""
    setup_logging()
    loop_config = with_private_inputs(loop_config)
    run = RunDir(loop_config["run_dir"])
    run_log = attach_run_log(run.log_path(f"rank{collective.rank()}-{os.getpid()}"), storage.write_bytes)
    try:
        fatal = read_fatal(run)
        learner = None
        if fatal is not None:
            log_event(log, "fatal_marker_found", level=logging.ERROR, rank=collective.rank(),
                      marker=run.fatal_marker, error=fatal.get("type"), message=fatal.get("message"))
        else:
            learner = setup_or_none(loop_config, run)
        if not all_ranks_ready(learner is not None):
            log_event(log, "stopped_before_training", rank=collective.rank(), marker=run.fatal_marker)
            return
        with fatal_errors_recorded(run, FATAL_WHILE_TRAINING, phase="training", rank=learner.rank):
            learner.run(stop_after_task=loop_config.get("stop_after_task"))
    finally:
        detach_run_log(run_log)
