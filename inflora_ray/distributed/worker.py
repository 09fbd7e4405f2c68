"""The Ray Train worker: each worker runs :class:`ContinualLearner` as one DDP rank; checkpoints and per-task
metrics go through ``ray.train.report``; rank 0 also writes each task's results into the run directory."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import ray.train
import torch
from ray.train import Checkpoint

from .. import storage
from ..config import Config, config_from_dict
from ..core.metrics import AccuracyRecord, summary
from ..logs import log_event, setup_logging
from ..rundir import META_FILE, STATE_FILE, RunDir, checkpoint_name
from ..training import collective
from ..training.learner import ContinualLearner, Hooks
from ..training.state import TaskReport, task_metrics
from .faults import FaultPlan

log = logging.getLogger(__name__)


def load_checkpoint_state(checkpoint: Checkpoint) -> dict:
    """The learner state stored in a checkpoint (downloaded first if remote)."""
    with checkpoint.as_directory() as d:
        path = Path(d) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint.path} has no {STATE_FILE}; is it an inflora-ray "
                                    "checkpoint?")
        return torch.load(path, map_location="cpu", weights_only=True)


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
        "own_head_accuracy_matrix": own.matrix(), "world_size": learner.world_size})


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
            self._report(learner, {"task": task, "epoch": epoch, "kind": "epoch"}, checkpoint_name(task, epoch))

    def on_task_end(self, learner, report: TaskReport):
        metrics = {"task": report.task, "tasks_done": report.task + 1, "num_tasks": learner.benchmark.num_tasks,
                   **task_metrics(report.to_dict(), finite_only=False)}
        if self.rank == 0:
            write_task_record(self.run, learner, report.task)
        self._report(learner, {**metrics, "kind": "task"}, checkpoint_name(report.task))

    def _report(self, learner, metrics: dict, name: str) -> None:
        # Every worker holds the same state; rank 0 writes it, the others report without a checkpoint.
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(learner.state_dict(), os.path.join(d, STATE_FILE))
            with open(os.path.join(d, META_FILE), "w") as f:
                json.dump({k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}, f)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point of one worker (a DDP rank). ``loop_config``: ``config`` (a Config as a dict),
    ``run_dir``, ``stop_after_task``, ``start_from`` (a checkpoint directory) and ``fault`` (tests only)."""
    setup_logging()
    cfg = config_from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    run = RunDir(loop_config["run_dir"])
    fault = FaultPlan.parse(loop_config["fault"]) if loop_config.get("fault") else None
    learner = ContinualLearner(cfg, device=device, hooks=RayHooks(cfg, run, fault))
    checkpoint = ray.train.get_checkpoint()
    origin = "latest checkpoint of this run"
    if checkpoint is None and loop_config.get("start_from"):
        checkpoint, origin = Checkpoint(path=loop_config["start_from"]), "--start-from"
    if checkpoint is not None:
        learner.load_state_dict(load_checkpoint_state(checkpoint))
        if learner.rank == 0:  # a branched run's directory also holds the tasks it inherited
            for t in range(learner.next_task):
                if not storage.exists(run.task_result(t)):
                    write_task_record(run, learner, t)
        log_event(log, "restored", origin=origin, checkpoint=str(checkpoint.path), next_task=learner.next_task,
                  mid_task=learner.in_progress is not None, rank=learner.rank, world_size=learner.world_size)
    log_event(log, "worker_start", rank=learner.rank, world_size=learner.world_size, device=str(device),
              threads=torch.get_num_threads())
    learner.run(stop_after_task=loop_config.get("stop_after_task"))
