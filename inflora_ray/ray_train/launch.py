"""The driver of one run: checks, then the whole task sequence as one Ray Train job, then the results.

Everything that can be checked is checked before Ray starts any worker (:mod:`.preflight`); MLflow problems
after the start never stop training (:class:`RunResult` says whether tracking was lost).
"""
from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from .. import storage
from ..config import Config, ConfigError
from ..logs import log_event
from ..preflight import (PreflightError, check_config, check_start_checkpoint, checked_benchmark, join_cluster,
                         start_tracker, warn_local_paths)
from ..provenance import accelerator, code_identity
from ..redact import has_secrets, redact_text, redact_tree, redact_uri, remember_secrets
from ..results import read_task_results, run_status, write_final_results
from ..rundir import RunClaimed, RunDir, check_contained, default_run_name
from ..tracking.store import TrackingUnavailable, credential_values, redact_config
from .errors import NonRetryableError, clear_fatal, fatal_message, read_fatal
from .faults import FaultPlan
from .progress import ProgressWatcher, print_final_table
from .resume import check_config_change, next_task_of, read_stored_config, record_config_change

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """What the user asks of a run besides its config (the flags of ``inflora-run``)."""
    name: Optional[str] = None  # the run's name (default: run.name, else one made from the config)
    resume: bool = False  # continue the run of this name from its latest checkpoint
    start_from: Optional[str] = None  # a checkpoint directory to start a new run from
    stop_after_task: Optional[int] = None  # stop after this task (0-based)
    allow_config_change: bool = False  # let --resume / --start-from change settings that alter results
    address: Optional[str] = None  # Ray address (None: the running or a new local Ray)


@dataclass(frozen=True)
class RunContext:
    """What the code that starts a run (the CLI, several seeds, a sweep's trial) hands it besides the user's
    options: where its MLflow run hangs, how it prints, and what it already knows."""
    parent_run_id: Optional[str] = None  # MLflow parent run (seeds, sweeps)
    label: str = ""  # prefix of the progress lines
    quiet_table: bool = False  # do not print the final table
    on_task: Optional[Callable[[dict], None]] = None  # called with each finished task's result file content
    train_callbacks: tuple = ()  # Ray Train callbacks (Tune's TuneReportCallback)
    # The run's dataset as scanned by a caller (a sweep's driver): a ScannedData or a Ray ObjectRef of one; the
    # run then neither lists nor verifies the dataset again (unless its data settings differ).
    data: Any = None
    # Whether the run's caller has asked it to stop (a sweep's trial that Ray Tune is stopping, or whose other
    # seed failed for good). Once true, the run's job is aborted within a second or so (:mod:`.stopping`); a
    # run that fails once this is true was cut off by that stop: it is saved as interrupted, and its MLflow
    # run is left for the caller to end (the sweep ends it as its trial ended: pruned, unfinished, error).
    stop_requested: Optional[Callable[[], bool]] = None
    stored_config: Optional[dict] = None  # --resume: the run's stored config, as the caller already read it
    # The caller knows no other driver runs this run (a sweep's trial: Tune restarts a trial only once its
    # process has died), so the run's hold is taken over whoever held it.
    sole_driver: bool = False
    start_state: Optional[dict] = None  # --start-from: the checkpoint's learner state, as the caller read it


class RunInterrupted(RuntimeError):
    """The driver was interrupted (Ctrl-C, SIGTERM); what was done is saved and the message says how to resume."""


class RunStopped(RunInterrupted):
    """The run's caller stopped it (:attr:`RunContext.stop_requested`); the caller ends its MLflow run."""


@dataclass
class RunResult:
    """What a finished (or stopped) run produced."""
    run_dir: str
    name: str
    tasks: list[dict]  # the task results rank 0 wrote (results/task_<t>.json)
    summary: dict
    mlflow_run_id: Optional[str] = None
    tracking_lost: Optional[str] = None  # why MLflow logging stopped mid-run, if it did
    checkpoint: Optional[str] = None  # the final checkpoint (Ray Train's Result.checkpoint), when training ended

    @property
    def accuracy_matrix(self) -> list[list[float]]:
        return self.summary["accuracy_matrix"]


def versions() -> dict:
    """Versions of the stack, recorded with every run."""
    import mlflow
    import ray
    import timm
    import torch

    from .. import __version__
    return {"inflora_ray": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "ray": ray.__version__, "mlflow": getattr(mlflow, "__version__", "?"), "python": sys.version.split()[0]}


def _run_dir(cfg: Config, name: Optional[str], storage_path: str) -> RunDir:
    """The run's folder; its name (given, or made from experiment.name) is checked before anything else."""
    given = name or cfg.run.name
    what = "run.name" if given else "the run name made from experiment.name (set run.name or --name)"
    try:
        return RunDir.of(storage_path, given or default_run_name(cfg), what=what)
    except ConfigError as e:
        raise PreflightError(str(e)) from None


def _continuation(cfg: Config, run: RunDir, opts: RunOptions, context: RunContext,
                  start_state: Optional[dict]) -> tuple[dict, int, str]:
    """For --resume / --start-from: the changes against the stored config (``results/config.yaml``, or the
    config saved in the ``--start-from`` checkpoint's ``start_state``) that alter results (refused unless
    allowed), the first task they apply to, and how the run continues."""
    if opts.resume:
        stored = context.stored_config if context.stored_config is not None else read_stored_config(run)
        how, from_task = "--resume", next_task_of(run)
    elif opts.start_from is not None:
        stored, how, from_task = start_state.get("config"), "--start-from", int(start_state["next_task"])
        if not isinstance(stored, dict):
            return {}, from_task, how
    else:
        return {}, 0, ""
    return check_config_change(stored, cfg, opts.allow_config_change, how), from_task, how


def _preflight(cfg: Config, run: RunDir, opts: RunOptions, scanned, context: RunContext):
    """The run's own checks before Ray starts (after :func:`~inflora_ray.preflight.check_config`); returns the
    benchmark (built from ``scanned``, the caller's scan, when given), the tracker (None without tracking) and
    the ``--start-from`` checkpoint's learner state (None without one)."""
    if not opts.resume and storage.exists(run.path):
        raise PreflightError(f"run {run.name!r} already exists in {cfg.run.storage_path}; continue it with "
                             f"--resume {run.name} or choose another run.name")
    try:
        check_contained(run.path, "run")
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    benchmark = checked_benchmark(cfg, scanned)
    start_state = None
    if opts.start_from is not None:
        start_state = check_start_checkpoint(opts.start_from, cfg, class_order=benchmark.class_order,
                                             state=context.start_state)
    if opts.stop_after_task is not None and not 0 <= opts.stop_after_task < benchmark.num_tasks:
        raise PreflightError(f"--stop-after-task {opts.stop_after_task}: must be in 0..{benchmark.num_tasks - 1}")
    return benchmark, start_tracker(cfg), start_state


def _scanned(data):
    """A ScannedData given directly or as a Ray ObjectRef (fetched); None stays None."""
    import ray

    return ray.get(data) if isinstance(data, ray.ObjectRef) else data


def shipped_data(benchmark, given=None, fetched=None):
    """What the workers get instead of scanning the dataset themselves: the caller's ObjectRef ``given`` when
    the benchmark was built from it (``fetched``, its value), else the driver's scan put in Ray's object store
    once; None for a benchmark built in memory (nothing to scan: each worker builds it)."""
    import ray

    from ..data.registry import get_benchmark

    if benchmark.scanned is None or get_benchmark(benchmark.name).in_memory:
        return None
    if isinstance(given, ray.ObjectRef) and benchmark.scanned is fetched:
        return given
    return ray.put(benchmark.scanned)


def _record(cfg: Config, benchmark, opts: RunOptions) -> dict:
    """The run's record (``results/record.json``, and its MLflow run's params and tags), credentials redacted
    (the dataset's provenance names its URI, ``--start-from`` a checkpoint's)."""
    return redact_tree({"name": cfg.run.name, "class_order": benchmark.class_order, "tasks": benchmark.tasks,
                        "dataset_manifest": benchmark.manifest, "versions": versions(), "start_from": opts.start_from,
                        "num_workers": cfg.run.num_workers, "code": code_identity(), "accelerator": accelerator()})


def print_runs_page(tracker, label: str = "") -> None:
    """Print where the MLflow UI lists the experiment's runs (tracking servers only); a failed look-up is
    logged, never raised: the run itself is tracked already."""
    try:
        page = tracker.runs_page()
    except TrackingUnavailable as e:
        log_event(log, "tracking_warning", level=logging.WARNING, message=str(e))
        return
    if page is not None:
        print(f"{label}MLflow: {page}", flush=True)


def _open_tracking(tracker, run: RunDir, record: dict, opts: RunOptions, context: RunContext) -> None:
    """Create (or on resume reopen) the run's MLflow run; failure here stops the run before compute."""
    previous = tracker.load_state(run) if opts.resume else {}
    try:
        tracker.start(run.name, record, parent_run_id=context.parent_run_id, resume_run_id=previous.get("run_id"))
    except TrackingUnavailable as e:
        raise PreflightError(str(e)) from None
    tracker.logged_tasks = set(previous.get("logged_tasks", []))


def checkpoint_config(cfg: Config, num_tasks: int):
    """Ray Train's retention: every task-boundary checkpoint (a run's branch points) and the latest mid-task
    ones. Ray keeps the ``num_tasks + run.checkpoints_to_keep`` checkpoints of highest retention score (and
    always the latest): task-boundary ones score above every mid-task one, later mid-task ones above earlier,
    so the task-boundary ones are never deleted and the mid-task ones fill the remaining places (the latest
    ``run.checkpoints_to_keep`` of them once every task is done). Pruning is Ray's own, so its record of
    the run's checkpoints, which a resume checks, stays true."""
    from ray.train import CheckpointConfig

    from .worker import RETENTION_SCORE

    keep = cfg.run.checkpoints_to_keep
    if keep is None or not cfg.run.checkpoint_every_epochs:
        return CheckpointConfig(num_to_keep=None)
    return CheckpointConfig(num_to_keep=num_tasks + keep, checkpoint_score_attribute=RETENTION_SCORE,
                            checkpoint_score_order="max")


def worker_config(cfg: Config, run: RunDir, opts: RunOptions, data=None) -> dict:
    """The ``train_loop_config`` of the run's Ray Train workers (read by :func:`.worker.train_worker`).

    Ray Train keeps it in its state actor, which the dashboard shows, and writes it to its export-event files
    (``RAY_ENABLE_EXPORT_API_WRITE``), so it holds no credential: the config redacted (:func:`redact_config`),
    the run folder and ``--start-from`` checkpoint redacted. The values with credentials that the workers need
    (run.storage_path, data.shards, data.root, the run folder, the checkpoint) travel as one Ray object,
    ``private`` (an ObjectRef: Ray Train records its id, never its content; it lives in the object store for
    the run's duration), which each worker reads back (:func:`.worker.with_private_inputs`). tracking.uri stays
    redacted: the workers never use it."""
    import ray

    private = {"config": {k: v for k, v in credential_values(cfg).items() if k != "tracking.uri"},
               "run_dir": run.path, "start_from": opts.start_from}
    private = {k: v for k, v in private.items() if v and (k == "config" or has_secrets(v))}
    return {"config": redact_config(cfg).to_dict(), "run_dir": redact_uri(run.path),
            "stop_after_task": opts.stop_after_task,
            "start_from": redact_uri(opts.start_from) if opts.start_from else None, "data": data,
            "fault": FaultPlan.for_run(run.name, cfg.experiment.seed),
            "private": ray.put(private) if private else None}


def _trainer(cfg: Config, run: RunDir, storage_path: str, opts: RunOptions, context: RunContext, num_tasks: int,
             data=None):
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from .trainer import RunTrainer
    from .worker import train_worker

    resources = {"CPU": cfg.run.cpus_per_worker}
    ray_path, ray_fs = storage.ray_storage(storage_path)
    if cfg.run.use_gpu:
        resources["GPU"] = cfg.run.gpus_per_worker
    return RunTrainer(
        train_worker,
        train_loop_config=worker_config(cfg, run, opts, data),
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run.name, storage_path=ray_path, storage_filesystem=ray_fs,
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             checkpoint_config=checkpoint_config(cfg, num_tasks),
                             callbacks=list(context.train_callbacks)),
    )


def run_experiment(cfg: Config, opts: RunOptions = RunOptions(), context: RunContext = RunContext()) -> RunResult:
    """Run (or resume) a continual experiment as a Ray Train job and return its results.

    Raises :class:`PreflightError` (or ``OSError`` for storage) before any compute if the name, model, data,
    storage, checkpoint, tracking server or cluster cannot work, ``RuntimeError`` if training fails beyond
    ``run.max_failures``, and :class:`RunInterrupted` when the driver is stopped (Ctrl-C, SIGTERM) after saving
    what was done.
    """
    if opts.start_from is not None:  # the workers, in other working directories, open the same folder
        opts = replace(opts, start_from=storage.absolute(opts.start_from))
        remember_secrets(opts.start_from)  # kept out of every message and log line
    storage_path = check_config(cfg, opts.address)
    run = _run_dir(cfg, opts.name, storage_path)
    scanned = _scanned(context.data)  # an ObjectRef from a sweep's driver is fetched once, here
    benchmark, tracker, start_state = _preflight(cfg, run, opts, scanned, context)
    changes, from_task, how = _continuation(cfg, run, opts, context, start_state)
    if opts.resume:  # a new run's folder is its own once claimed; a resumed one is held by one driver at a time
        try:
            run.hold(take_over=context.sole_driver)
        except RunClaimed as e:
            raise PreflightError(str(e)) from None
    try:
        return _launch(cfg, run, storage_path, benchmark, tracker, (changes, from_task, how), opts, context, scanned)
    finally:
        run.release_hold()


def _launch(cfg: Config, run: RunDir, storage_path: str, benchmark, tracker, continuation: tuple, opts: RunOptions,
            context: RunContext, scanned) -> RunResult:
    """Join the cluster, claim a new run's folder, open its MLflow run and write its config and record, then
    fit the Ray Train job and write the results (:func:`run_experiment` after its checks)."""
    changes, from_task, how = continuation
    join_cluster(cfg, opts.address)
    warn_local_paths(cfg, tracker, start_from=opts.start_from)

    cfg = cfg.with_values({"run.name": run.name})
    record = _record(cfg, benchmark, opts)
    if not opts.resume:
        try:
            run.claim()
            run.hold()
        except RunClaimed as e:
            raise PreflightError(f"{e}; continue it with --resume {run.name} or choose another run.name") from None
    try:
        if tracker is not None:
            _open_tracking(tracker, run, record, opts, context)
    except BaseException:
        if not opts.resume:
            run.release_hold()
            run.release()
        raise
    if not opts.resume or changes:
        storage.write_bytes(run.config, redact_config(cfg).to_yaml().encode())
    if not opts.resume:
        storage.write_json(run.record, record)
    if changes:
        record_config_change(run, changes, from_task, how, tracker)
    if tracker is not None:
        tracker.save_state(run)
    log_event(log, "run_start", name=run.name, run_dir=run.path, workers=cfg.run.num_workers, resume=opts.resume,
              method=cfg.method.name, benchmark=cfg.data.benchmark, tasks=benchmark.num_tasks,
              mlflow_run_id=tracker.run_id if tracker else None)
    print(redact_text(f"{context.label}{'resuming' if opts.resume else 'run'} {run.name}: {cfg.method.name} on "
                      f"{cfg.data.benchmark}, {benchmark.num_tasks} tasks, {cfg.run.num_workers} worker(s); results "
                      f"in {run.results}, log in {run.log_location}"), flush=True)
    if tracker is not None and not context.quiet_table:
        print_runs_page(tracker, context.label)
    if opts.resume:
        clear_fatal(run)
    data = shipped_data(benchmark, context.data, scanned)
    # A caller that may ask the run to stop (a sweep's trial) gets it stopped at once (:mod:`.stopping`).
    from .stopping import StopRelay

    relay = StopRelay(run.path, context.stop_requested) if context.stop_requested is not None else None
    if relay is not None:
        context = replace(context, train_callbacks=(*context.train_callbacks, relay.callback))
    trainer = _trainer(cfg, run, storage_path, opts, context, benchmark.num_tasks, data)
    with relay if relay is not None else nullcontext():
        error, checkpoint = _fit(trainer, run, benchmark.num_tasks, tracker, opts, context)
    return _finish(cfg, run, benchmark.num_tasks, tracker, opts, context, error, checkpoint)


class _Interrupt(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM, so the driver stops as on Ctrl-C.

    A KeyboardInterrupt, because the driver spends the run blocked in ``ray.get``, where Ray runs signal
    handlers through its own check (``check_signals`` in Ray's ``_raylet.pyx``) and stops waiting only on a
    KeyboardInterrupt or SystemExit: any other exception a handler raises is printed and the wait goes on,
    so ``ray job stop`` would find the driver still waiting when it sends SIGKILL."""


def _raise_interrupt(signum, frame):
    raise _Interrupt(signal.Signals(signum).name)


def resume_command(cfg: Config, run: RunDir) -> str:
    """The command that continues ``run``, credentials redacted: a storage path or shards URI that holds them
    is shown with ``***`` in their place, and the data setting is named (``--resume`` must be given it again)."""
    data = {k: v for k, v in credential_values(cfg).items() if k.startswith("data.")}
    again = "".join(f" {k}={redact_uri(v)}" for k, v in data.items())
    parent = run.path.rstrip("/").rsplit("/", 1)[0]
    command = redact_text(f"python -m inflora_ray.run --resume {run.name} run.storage_path={parent}{again}")
    return command + (" (with the credentials in place of ***)" if "***" in command else "")


def _fatal_error(run: RunDir) -> Optional[NonRetryableError]:
    """The error a worker recorded as one no restart can fix, if any (:mod:`.errors`)."""
    record = read_fatal(run)
    return None if record is None else NonRetryableError(redact_text(f"run {run.name!r}: {fatal_message(record)}"))


def final_checkpoint(result, run: RunDir) -> Optional[str]:
    """The checkpoint of Ray Train's ``Result`` (the last one reported), as a path or URI in the run's folder."""
    checkpoint = getattr(result, "checkpoint", None)
    if checkpoint is None:
        return None
    return storage.join(run.path, checkpoint.path.rstrip("/").rsplit("/", 1)[-1])


def _fit(trainer, run: RunDir, num_tasks: int, tracker, opts: RunOptions,
         context: RunContext) -> tuple[Optional[BaseException], Optional[str]]:
    """Fit the trainer while printing (and tracking) each task as it finishes; returns the error, if any
    (a :class:`RunInterrupted` when the driver was stopped), and the final checkpoint of Ray's Result."""
    def task_done(rec: dict) -> None:
        if tracker is not None:
            tracker.log_task(rec, run)
        if context.on_task is not None:
            context.on_task(rec)

    watcher = ProgressWatcher(run, num_tasks, on_task=task_done, label=context.label, renew=run.renew_hold,
                              seen=tracker.logged_tasks if tracker else None)
    main = threading.current_thread() is threading.main_thread()
    # Ray Train installs its own SIGINT handler during fit (it aborts the workers); SIGTERM gets ours.
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    received: list[str] = []  # the signal that stopped the run (ray.get turns _Interrupt into a plain one)

    def on_sigterm(signum, frame):
        received.append(signal.Signals(signum).name)
        _raise_interrupt(signum, frame)

    if main:
        signal.signal(signal.SIGTERM, on_sigterm)
    watcher.start()
    try:
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as e:
        if received:
            # The process is being terminated (`ray job stop`, a pod's deletion) and must save and exit within
            # the stop wait: objects that exist now are left out of the interpreter's final garbage
            # collection, which took about 4 s of a driver's exit (docs/performance.md).
            gc.freeze()
        return RunInterrupted(f"interrupted ({received[0] if received else type(e).__name__})"), None
    except Exception as e:  # ray.train.TrainingFailedError and friends
        if context.stop_requested is not None and context.stop_requested():
            # Tune removes a stopped trial's resources, which kills this run's controller and workers.
            return RunStopped(f"stopped by its caller ({type(e).__name__})"), None
        return _fatal_error(run) or e, None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        watcher.stop()
    fatal = _fatal_error(run)  # the workers stopped on an error no restart can fix
    if fatal is not None:
        return fatal, None
    expected = num_tasks if opts.stop_after_task is None else opts.stop_after_task + 1
    if len(run.finished_tasks()) < expected:  # Ray Train's own Ctrl-C handler aborted the workers
        return RunInterrupted("interrupted (the training run was aborted)"), None
    return None, final_checkpoint(result, run)


def _finish(cfg: Config, run: RunDir, num_tasks: int, tracker, opts: RunOptions, context: RunContext,
            error: Optional[BaseException], checkpoint: Optional[str] = None) -> RunResult:
    """Write the results so far, close the MLflow run, print the table; raise if training failed or stopped."""
    interrupted = isinstance(error, RunInterrupted)
    tasks, summ = read_task_results(run, num_tasks)
    status = run_status(len(tasks), num_tasks, failed=error is not None and not interrupted, interrupted=interrupted)
    try:
        write_final_results(run, tasks, summ, status, eval_split=cfg.data.eval_split)
    except OSError as e:  # a full disk, a lost store: the tasks' results and checkpoints are kept
        error, interrupted, status = e, False, "failed"
    reason = f"{type(error).__name__}: {error}" if error is not None else None
    if status == "stopped":
        reason = (f"stopped after task {len(tasks) - 1} of 0..{num_tasks - 1} (--stop-after-task); "
                  f"--resume {run.name} continues it")
    if tracker is not None:
        tracker.finish(run, summ, run_status=status, reason=reason, checkpoint=checkpoint,
                       close=not isinstance(error, RunStopped))
    if not context.quiet_table:
        print_final_table(run.name, summ, num_tasks, eval_split=cfg.data.eval_split)
    if tracker is not None and tracker.lost:
        print(f"{context.label}warning: MLflow tracking at {tracker.uri} was lost during the run ({tracker.lost}); "
              f"training went on and every result is in {run.results}", file=sys.stderr, flush=True)
    resume = resume_command(cfg, run)
    if isinstance(error, NonRetryableError):
        raise error
    # The messages are redacted here already: a sweep's trial error is stored by Ray Tune (error.txt).
    if interrupted:
        raise RunInterrupted(redact_text(f"run {run.name!r} {error} after {len(tasks)} task(s); results so far are "
                                         f"in {run.results}\nresume it with: {resume}"))
    if error is not None:
        raise RuntimeError(redact_text(f"run {run.name!r} failed after {len(tasks)} task(s): {type(error).__name__}: "
                                       f"{error}\nthe workers' log: {run.log_location}\nresume it with: {resume}")
                           ) from error
    log_event(log, "run_end", name=run.name, tasks_done=len(tasks), results=run.results,
              mlflow_run_id=tracker.run_id if tracker else None, tracking_lost=tracker.lost if tracker else None)
    return RunResult(run_dir=run.path, name=run.name, tasks=tasks, summary=summ,
                     mlflow_run_id=tracker.run_id if tracker else None,
                     tracking_lost=tracker.lost if tracker else None, checkpoint=checkpoint)
