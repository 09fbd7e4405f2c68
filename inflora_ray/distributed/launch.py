"""The driver of one run: checks, then the whole task sequence as one Ray Train job, then the results.

Everything that can be checked is checked before Ray starts any worker (:mod:`.preflight`); MLflow problems
after the start never stop training (:class:`RunResult` says whether tracking was lost).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import yaml

from .. import storage
from ..config import Config, config_from_dict
from ..presets import apply_overrides
from ..logs import log_event
from ..rundir import RunDir, is_checkpoint
from .faults import FaultPlan
from .preflight import (PreflightError, check_model, check_resources, check_storage, connect_ray, start_tracker,
                        warn_local_paths)
from .progress import ProgressWatcher, print_final_table

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """How to launch a run, besides its config."""
    resume: bool = False  # continue the run of this name from its latest checkpoint
    stop_after_task: Optional[int] = None  # stop after this task (0-based)
    start_from: Optional[str] = None  # a checkpoint directory to start a new run from
    address: Optional[str] = None  # Ray address (None: the running or a new local Ray)
    parent_run_id: Optional[str] = None  # MLflow parent run (seeds, sweeps)
    label: str = ""  # prefix of the progress lines
    quiet_table: bool = False  # do not print the final table
    on_task: Optional[Callable[[dict], None]] = None  # called with each finished task's record
    train_callbacks: list = field(default_factory=list)  # Ray Train callbacks (Tune's report callback)


@dataclass
class RunResult:
    """What a finished (or stopped) run produced."""
    run_dir: str
    name: str
    tasks: list[dict]  # per-task records written by rank 0
    summary: dict
    mlflow_run_id: Optional[str] = None
    tracking_lost: Optional[str] = None  # why MLflow logging stopped mid-run, if it did

    @property
    def accuracy_matrix(self) -> list[list[float]]:
        return self.summary["accuracy_matrix"]


def default_run_name(cfg: Config, with_seed: bool = True) -> str:
    """``<experiment>-<method>[-s<seed>]-<YYYYmmdd-HHMMSS>``."""
    seed = f"-s{cfg.experiment.seed}" if with_seed else ""
    return f"{cfg.experiment.name}-{cfg.method.name}{seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def versions() -> dict:
    """Versions of the stack, recorded with every run."""
    import mlflow
    import ray
    import timm

    from .. import __version__
    return {"inflora_ray": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "ray": ray.__version__, "mlflow": getattr(mlflow, "__version__", "?"), "python": sys.version.split()[0]}


def _upgrade_stored_config(data: dict) -> dict:
    """A config stored by an earlier version, in today's keys: the test-only ``debug`` section is gone and
    ``data.num_workers`` is ``data.loader_workers``."""
    data.pop("debug", None)
    section = data.get("data")
    if isinstance(section, dict) and "num_workers" in section:
        section.setdefault("loader_workers", section.pop("num_workers"))
    return data


def load_run_config(storage_path: str, run: str, overrides: list[str]) -> tuple[Config, str]:
    """The stored config of run ``run`` (a name under ``storage_path``, or a run directory), with overrides."""
    if storage.exists(RunDir(run).config):
        run_dir = RunDir(run)
        storage_path, name = run.rstrip("/").rsplit("/", 1) if "/" in run else (".", run)
    else:
        name = run
        run_dir = RunDir.of(storage_path, run)
    if not storage.exists(run_dir.config):
        raise PreflightError(f"--resume {run!r}: no run found at {run_dir.path} (no results/config.yaml); give the "
                             f"run name and the same run.storage_path, or the run directory")
    data = _upgrade_stored_config(yaml.safe_load(storage.read_bytes(run_dir.config)))
    data.setdefault("run", {})["storage_path"] = storage_path
    apply_overrides(data, overrides)
    return config_from_dict(data), name


def _preflight(cfg: Config, run: RunDir, opts: RunOptions):
    """Every check before Ray starts; returns the benchmark and the tracker (None without tracking)."""
    from ..data import build_benchmark

    check_model(cfg)
    if not opts.resume and storage.exists(run.path):
        raise PreflightError(f"run {run.name!r} already exists in {cfg.run.storage_path}; continue it with "
                             f"--resume {run.name} or choose another run.name")
    if opts.start_from is not None and not is_checkpoint(opts.start_from):
        raise PreflightError(f"--start-from {opts.start_from!r}: no inflora-ray checkpoint there (state.pt missing)")
    try:
        benchmark = build_benchmark(cfg.data, cfg.model.img_size, model=cfg.model)
    except (OSError, ValueError) as e:
        raise PreflightError(f"data: {e}") from None
    if opts.stop_after_task is not None and not 0 <= opts.stop_after_task < benchmark.num_tasks:
        raise PreflightError(f"--stop-after-task {opts.stop_after_task}: must be in 0..{benchmark.num_tasks - 1}")
    return benchmark, start_tracker(cfg)


def _record(cfg: Config, benchmark, opts: RunOptions) -> dict:
    return {"name": cfg.run.name, "class_order": benchmark.class_order, "tasks": benchmark.tasks,
            "dataset_manifest": benchmark.manifest, "versions": versions(), "start_from": opts.start_from,
            "num_workers": cfg.run.num_workers}


def _open_tracking(tracker, run: RunDir, record: dict, opts: RunOptions) -> None:
    """Create (or on resume reopen) the run's MLflow run; failure here stops the run before compute."""
    previous = tracker.load_state(run) if opts.resume else {}
    try:
        tracker.start(run.name, record, parent_run_id=opts.parent_run_id, resume_run_id=previous.get("run_id"))
    except Exception as e:
        raise PreflightError(f"MLflow at {tracker.uri}: cannot start the run ({type(e).__name__}: "
                             f"{str(e)[:300]}); fix the tracking store or run with tracking.enabled=false") from None
    tracker.logged_tasks = set(previous.get("logged_tasks", []))


def _trainer(cfg: Config, run: RunDir, storage_path: str, opts: RunOptions):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .worker import train_worker

    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = cfg.run.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run.path, "stop_after_task": opts.stop_after_task,
                           "start_from": opts.start_from, "fault": FaultPlan.from_env()},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run.name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
                             callbacks=list(opts.train_callbacks)),
    )


def run_experiment(cfg: Config, name: Optional[str] = None, **options) -> RunResult:
    """Run (or resume) a continual experiment as a Ray Train job and return its results.

    ``options`` are the fields of :class:`RunOptions`. Raises :class:`PreflightError` (or ``OSError`` for
    storage) before any compute if the model, storage, checkpoint, tracking server or cluster cannot work,
    and ``RuntimeError`` if training fails beyond ``run.max_failures``.
    """
    opts = RunOptions(**options)
    storage_path = check_storage(cfg)
    name = name or cfg.run.name or default_run_name(cfg)
    run = RunDir.of(storage_path, name)
    benchmark, tracker = _preflight(cfg, run, opts)
    connect_ray(opts.address)
    check_resources(cfg)
    warn_local_paths(cfg, tracker)

    cfg = cfg.with_values({"run.name": name})
    record = _record(cfg, benchmark, opts)
    if tracker is not None:
        _open_tracking(tracker, run, record, opts)
    if not opts.resume:
        storage.write_bytes(run.config, cfg.to_yaml().encode())
        storage.write_json(run.record, record)
    if tracker is not None:
        tracker.save_state(run)
    log_event(log, "run_start", name=name, run_dir=run.path, workers=cfg.run.num_workers, resume=opts.resume,
              method=cfg.method.name, benchmark=cfg.data.benchmark, tasks=benchmark.num_tasks,
              mlflow_run_id=tracker.run_id if tracker else None)
    error = _fit(_trainer(cfg, run, storage_path, opts), run, benchmark.num_tasks, tracker, opts)
    return _finish(cfg, run, benchmark.num_tasks, tracker, opts, error)


def _fit(trainer, run: RunDir, num_tasks: int, tracker, opts: RunOptions) -> Optional[BaseException]:
    """Fit the trainer while printing (and tracking) each task as it finishes; returns the error, if any."""
    def task_done(rec: dict) -> None:
        if tracker is not None:
            tracker.log_task(rec, run)
        if opts.on_task is not None:
            opts.on_task(rec)

    watcher = ProgressWatcher(run, num_tasks, on_task=task_done, label=opts.label,
                              seen=tracker.logged_tasks if tracker else None)
    watcher.start()
    try:
        trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and friends
        return e
    finally:
        watcher.stop()
    return None


def _finish(cfg: Config, run: RunDir, num_tasks: int, tracker, opts: RunOptions,
            error: Optional[BaseException]) -> RunResult:
    """Write the final results, close the MLflow run, print the table; raise if training failed."""
    tasks, summ = run.collect_results(num_tasks)
    if tasks:
        run.write_final_results(tasks, summ)
    if tracker is not None:
        tracker.finish(run, summ, failed=error is not None)
    if not opts.quiet_table:
        print_final_table(run.name, summ, num_tasks)
    if tracker is not None and tracker.lost:
        print(f"{opts.label}warning: MLflow tracking at {tracker.uri} was lost during the run ({tracker.lost}); "
              f"training went on and every result is in {run.results}", file=sys.stderr, flush=True)
    if error is not None:
        raise RuntimeError(f"run {run.name!r} failed after {len(tasks)} task(s): {type(error).__name__}: {error}\n"
                           f"resume it with: python -m inflora_ray.run --resume {run.name} "
                           f"run.storage_path={cfg.run.storage_path}") from error
    log_event(log, "run_end", name=run.name, tasks_done=len(tasks), results=run.results,
              mlflow_run_id=tracker.run_id if tracker else None, tracking_lost=tracker.lost if tracker else None)
    return RunResult(run_dir=run.path, name=run.name, tasks=tasks, summary=summ,
                     mlflow_run_id=tracker.run_id if tracker else None,
                     tracking_lost=tracker.lost if tracker else None)
