"""The Ray Train layer: each worker runs :class:`ContinualLearner` as one DDP rank; checkpoints and per-task
reports go through ``ray.train.report``; rank 0 also writes each task's results to the run directory."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
import ray.train
import torch
from ray.train import Checkpoint

from .. import storage
from ..training import collective
from ..config import Config, config_from_dict
from ..logs import log_event, setup_logging
from ..core.metrics import AccuracyRecord, summary
from ..training.learner import ContinualLearner, Hooks, TaskReport

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def results_dir(run_dir: str) -> str:
    """Where a run's human-readable results live (``<run_dir>/results``)."""
    return storage.join(run_dir, "results")


def task_result_path(run_dir: str, task: int) -> str:
    return storage.join(results_dir(run_dir), f"task_{task:03d}.json")


def flat_metrics(report: TaskReport, num_tasks: int) -> dict:
    """Scalar metrics of a task report, for ``ray.train.report``/Tune (NaN where undefined)."""
    m = {
        "task": report.task, "tasks_done": report.task + 1, "num_tasks": num_tasks,
        "pooled_accuracy": report.pooled_accuracy,
        "average_incremental_accuracy": report.average_incremental_accuracy,
        "forgetting": report.forgetting, "backward_transfer": report.backward_transfer,
        "train_loss": report.train_loss, "task_seconds": report.task_seconds,
        "images_per_second": report.images_per_second, "peak_memory_mb": report.peak_memory_mb,
    }
    m.update({f"accuracy_task_{j}": a for j, a in enumerate(report.accuracy)})
    return m


def load_checkpoint_state(checkpoint: Checkpoint) -> dict:
    """The learner state stored in a checkpoint (downloaded first if remote)."""
    with checkpoint.as_directory() as d:
        path = Path(d) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint.path} has no {STATE_FILE}; is it an inflora-ray "
                                    "checkpoint?")
        return torch.load(path, map_location="cpu", weights_only=True)


def write_task_record(run_dir: str, learner: ContinualLearner, task: int) -> None:
    """Write ``results/task_<t>.json``: the task's report and the metrics as they stood after it."""
    rows = task + 1
    record = AccuracyRecord(correct=learner.record.correct[:rows], total=learner.record.total[:rows])
    own = AccuracyRecord(correct=learner.own_head_record.correct[:rows], total=learner.own_head_record.total[:rows])
    if task < len(learner.method.history):  # the task's finished adapter (A, B_k, B_v per layer)
        buf = io.BytesIO()
        torch.save(learner.method.history[task], buf)
        storage.write_bytes(storage.join(results_dir(run_dir), f"adapters_task_{task:03d}.pt"), buf.getvalue())
    storage.write_json(task_result_path(run_dir, task), {
        "report": learner.reports[task].to_dict(), "summary": summary(record),
        "own_head_accuracy_matrix": own.matrix(), "world_size": learner.world_size})


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook (tests)."""


class RayHooks(Hooks):
    """Report and checkpoint through Ray Train; inject a fault once when configured."""

    def __init__(self, cfg: Config, run_dir: str):
        self.cfg = cfg
        self.run_dir = run_dir
        self.rank = collective.rank()

    def on_step(self, learner, task, epoch, step):
        d = self.cfg.debug
        if d.fail_at_task is None or (task, epoch, step) != (d.fail_at_task, d.fail_at_epoch, d.fail_at_step):
            return
        if self.rank != d.fail_rank:
            return
        marker = storage.join(self.run_dir, ".fault_injected")
        if storage.exists(marker):
            return  # inject once per run
        storage.write_bytes(marker, b"1")
        log_event(log, "fault_injected", level=logging.WARNING, task=task, epoch=epoch, step=step,
                  mode=d.fail_mode, rank=self.rank)
        if d.fail_mode == "exit":
            os._exit(13)
        raise InjectedFault(f"injected fault at task {task} epoch {epoch} step {step}")

    def on_epoch_end(self, learner, task, epoch):
        k = self.cfg.run.checkpoint_every_epochs
        if k and (epoch + 1) % k == 0 and epoch + 1 < self.cfg.train.epochs:
            self._report(learner, {"task": task, "epoch": epoch, "kind": "epoch"},
                         f"checkpoint_task{task:03d}_epoch{epoch:03d}")

    def on_task_end(self, learner, report):
        metrics = flat_metrics(report, learner.benchmark.num_tasks)
        if self.rank == 0:
            write_task_record(self.run_dir, learner, report.task)
        self._report(learner, {**metrics, "kind": "task"}, f"checkpoint_task{report.task:03d}")

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
    """Ray Train entry point of one worker (a DDP rank)."""
    setup_logging()
    cfg = config_from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(cfg.run.cpus_per_worker)))
    if cfg.run.use_gpu:
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    run_dir = loop_config["run_dir"]
    learner = ContinualLearner(cfg, device=device, hooks=RayHooks(cfg, run_dir))
    checkpoint = ray.train.get_checkpoint()
    origin = "latest checkpoint of this run"
    if checkpoint is None and loop_config.get("start_from"):
        checkpoint, origin = Checkpoint(path=loop_config["start_from"]), "--start-from"
    if checkpoint is not None:
        learner.load_state_dict(load_checkpoint_state(checkpoint))
        if learner.rank == 0:  # a branched run's directory also holds the tasks it inherited
            for t in range(learner.next_task):
                if not storage.exists(task_result_path(run_dir, t)):
                    write_task_record(run_dir, learner, t)
        log_event(log, "restored", origin=origin, checkpoint=str(checkpoint.path), next_task=learner.next_task,
                  mid_task=learner._in_task is not None, rank=learner.rank, world_size=learner.world_size)
    log_event(log, "worker_start", rank=learner.rank, world_size=learner.world_size, device=str(device),
              threads=torch.get_num_threads())
    learner.run(stop_after_task=loop_config.get("stop_after_task"))
