"""Ray Tune sweeps where every trial is a full continual run (one per seed, :mod:`.trial`).

Trials report after every task (``tasks_done`` is the time attribute), so ASHA stops bad trials at task
boundaries, comparing trials at the same task. Only trials that completed every task of the sweep compete
for the winner (:func:`select_best`); a stopped trial is "pruned" for the searcher too (:mod:`.hooks`).
Every trial's runs are MLflow children of the sweep's parent run and end with the trial's true status; the
parent gets the table of all trials and the best config as YAML (``python -m inflora_ray.run --config``).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import signal
import sys
import threading
from dataclasses import dataclass, replace
from typing import Optional

from .. import storage
from ..config import Config, ConfigError
from ..data.registry import get_benchmark
from ..logs import is_verbose, log_event
from ..preflight import PreflightError, check_config, checked_benchmark, join_cluster, start_tracker
from ..redact import has_secrets, redact_text, redact_uri
from ..rundir import RunClaimed, SweepDir, check_contained, default_sweep_name
from ..tracking.store import redact_config, restore_credentials
from .search_space import SearchSpace, SpaceError
from .trial import SPREAD_METRICS, error_cause, history_text

log = logging.getLogger(__name__)

# run.max_failures of the trials' runs when the config leaves it at 0 (recorded in sweep.json's config).
SWEEP_RUN_MAX_FAILURES = 2
# data.val_fraction of the trials when the config leaves it unset: trials are ranked on this part of the training
# data, held out (as CODA-Prompt tunes on 20% of the training data); 0 in the config ranks them on the test set.
SWEEP_VAL_FRACTION = 0.2
# Ray Tune's own console (its status tables): only with --verbose; the sweep prints a line per trial event.
TUNE_SILENT, TUNE_VERBOSE = 0, 2


@dataclass(frozen=True)
class SweepOptions:
    """What the user asks of a sweep besides its config and space (the flags of ``inflora-tune``): how it
    searches and schedules its trials."""
    name: Optional[str] = None  # default: sweep-<experiment>-<time>
    num_samples: int = 1  # samples per point of the space (grid: repeats)
    max_concurrent: Optional[int] = None  # default: as many trials as the cluster can ever hold at once
    scheduler: str = "asha"  # "asha" or "fifo"
    search: str = "random"  # "random", "optuna" or "grid"
    first_tasks: Optional[int] = None  # tune on the first K tasks, then run the winner over all tasks
    resume: bool = False  # continue the sweep ``name``
    address: Optional[str] = None  # Ray address
    grace_period: int = 1  # ASHA: tasks before a trial can be stopped
    reduction_factor: float = 2.0  # ASHA
    seeds_per_trial: int = 1  # seeds each trial runs; trials are ranked on the mean
    trial_retries: int = 2  # restarts of a trial whose process or node was lost
    max_trials: int = 1000  # a sweep that would start more trials is refused (raise it knowingly)


@dataclass
class _Sweep:
    """One sweep being run: its config (as given, and as the trials get it), space, directory, options, task
    count and MLflow parent."""
    cfg: Config  # as given (with the tracking URI the user wrote)
    base: Config  # what every trial starts from
    space: SearchSpace
    dir: SweepDir
    opts: SweepOptions
    num_tasks: int
    tracker: object = None  # the parent run's Tracker (None without tracking)
    parent_closed: bool = False  # the parent run has been given its final status
    record: Optional[dict] = None  # the resumed sweep's sweep.json (read once)
    scanned: object = None  # the dataset as this driver scanned it (a ScannedData)
    data: object = None  # the same in Ray's object store (an ObjectRef) for the trials; None: built in memory

    def close_parent(self, status: str, metrics: Optional[dict] = None, files: tuple[str, ...] = ()) -> None:
        """End the sweep's MLflow parent run (no-op without tracking)."""
        if self.tracker is not None:
            self.tracker.finish_parent(metrics or {}, files=files, status=status)
        self.parent_closed = True

    @property
    def horizon(self) -> int:
        """Tasks every trial runs (``--first-tasks``, else all)."""
        return self.opts.first_tasks or self.num_tasks

    @property
    def parent_id(self) -> Optional[str]:
        return self.tracker.run_id if self.tracker is not None else None

    @property
    def held_out(self) -> bool:
        """True when the trials are ranked on validation images held out of the training data."""
        return self.base.data.eval_split == "validation"

    @property
    def search_seeds(self) -> list[int]:
        """The seeds every trial runs (:meth:`.trial.TrialPlan.seeds`)."""
        return [self.base.experiment.seed + k for k in range(self.opts.seeds_per_trial)]

    @property
    def final_seeds(self) -> list[int]:
        """The seeds of the winner's final runs: with held-out selection, as many seeds again, none of them used
        by the search (its test accuracy is not the luck of the seeds it was chosen on); else the search's."""
        if not self.held_out:
            return self.search_seeds
        return [s + self.opts.seeds_per_trial for s in self.search_seeds]

    @property
    def runs_final(self) -> bool:
        """Whether the winner is run again after the search: over every task (``--first-tasks``), and on the
        test set with fresh seeds (held-out selection)."""
        return self.held_out or self.horizon < self.num_tasks


def planned_trials(space: SearchSpace, num_samples: int) -> int:
    """How many trials a sweep runs: ``num_samples`` times the number of grid points."""
    return num_samples * math.prod(len(p.values) for p in space.params if p.kind == "grid")


def default_concurrency(cfg: Config, seeds_per_trial: int = 1, trials: Optional[int] = None) -> int:
    """How many trials to start at once: as many as the cluster can ever hold with all their seeds' workers
    placed (an autoscaling cluster counted at its maximum size, so that waiting trials make it scale up),
    at most ``trials`` and at least 1. Trials beyond what is up now wait for Ray to place their workers."""
    from ..preflight import cluster_capacity

    have = cluster_capacity()
    runs = max(1, seeds_per_trial)
    n = int(have.get("CPU", 0) // (cfg.run.num_workers * cfg.run.cpus_per_worker * runs))
    if cfg.run.use_gpu:
        n = min(n, int(have.get("GPU", 0) // (cfg.run.num_workers * cfg.run.gpus_per_worker * runs)))
    if trials is not None:
        n = min(n, trials)
    return max(1, n)


def trial_status(result, outcomes: dict[str, dict], horizon: int) -> str:
    """How a trial ended: ``completed`` (every task of the horizon), ``pruned`` (stopped by the scheduler),
    ``error``, or ``unfinished`` (the sweep was interrupted; ``--resume`` continues it)."""
    if result.error:
        return "error"
    m = result.metrics or {}
    rec = outcomes.get(m.get("trial_id"))
    if rec is not None:
        return rec["outcome"]
    return "completed" if int(m.get("tasks_done", 0) or 0) >= horizon else "unfinished"


def trial_table(results, space: SearchSpace, horizon: int, outcomes: Optional[dict] = None) -> list[dict]:
    """One row per trial: id, status, tasks done, seeds, parameters, last reported metrics (means over the
    trial's seeds, with ``<metric>_std``) and the error of a failed trial."""
    outcomes = outcomes or {}
    rows = []
    for r in results:
        m = r.metrics or {}
        tid = m.get("trial_id") or (r.path.rstrip("/").rsplit("/", 1)[-1] if r.path else None)
        row = {"trial_id": tid, "status": trial_status(r, outcomes, horizon),
               "tasks_done": int(m.get("tasks_done", 0) or 0), "seeds": m.get("seeds")}
        row.update({f"param.{p.key}": (r.config or {}).get(p.key) for p in space.params})
        for k in SPREAD_METRICS:
            for key in (k, f"{k}_std"):
                v = m.get(key)
                row[key] = float(v) if v is not None else math.nan
        rec = outcomes.get(tid) or {}
        err = rec.get("error") or (str(r.error).strip().splitlines()[-1][:500] if r.error else "")
        row["error"] = err
        # why it errored (transient: --resume re-runs it; permanent), how often it was started, its history
        row["cause"] = (rec.get("cause") or error_cause(err)) if row["status"] == "error" else ""
        row["attempts"] = rec.get("attempts")
        row["earlier"] = history_text(rec)
        rows.append(row)
    return rows


def select_best(rows: list[dict], metric: str, mode: str) -> dict:
    """The winning trial: the best ``metric`` among trials that completed the horizon. A pruned trial's last
    report is from an earlier task, where metrics such as average incremental accuracy are higher, so it
    never competes. Raises ``RuntimeError`` saying what happened when no trial completed."""
    done = [r for r in rows if r["status"] == "completed" and not math.isnan(r.get(metric, math.nan))]
    if not done:
        counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in ("pruned", "error", "unfinished"))
        raise RuntimeError(f"no trial completed every task of the sweep ({counts}): there is no winner; see the "
                           "trials' errors above")
    pick = max if mode == "max" else min
    return pick(done, key=lambda r: r[metric])


def write_trial_table(sweep: SweepDir, rows: list[dict]) -> None:
    """The trial table as CSV and Parquet in the sweep directory."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path, parquet_path = sweep.table_files
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(csv_path, buf.getvalue().encode())
    table = pa.table({k: [json.dumps(r.get(k)) if isinstance(r.get(k), (list, dict)) else r.get(k) for r in rows]
                      for k in keys})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(parquet_path, sink.getvalue().to_pybytes())


def check_size(space: SearchSpace, opts: SweepOptions) -> None:
    """Refuse a sweep that would start more than ``opts.max_trials`` trials (before anything is built)."""
    trials = planned_trials(space, opts.num_samples)
    if trials > opts.max_trials:
        grids = " x ".join(str(len(p.values)) for p in space.params if p.kind == "grid") or "no grid"
        raise SpaceError(f"the sweep would start {trials} trials ({opts.num_samples} sample(s) x grid {grids}), "
                         f"{trials * opts.seeds_per_trial} runs with --seeds-per-trial {opts.seeds_per_trial}; "
                         f"the limit is --max-trials {opts.max_trials}: shrink the space or --num-samples, or raise "
                         "--max-trials if you mean it")


def check_no_repeats(space: SearchSpace, opts: SweepOptions) -> None:
    """Refuse ``--num-samples`` > 1 on a space that is all grid: every trial runs the same seeds, so each
    sample of a grid point would repeat the same runs (the same result, paid for again)."""
    if opts.num_samples > 1 and all(p.kind == "grid" for p in space.params):
        raise SpaceError(f"--num-samples {opts.num_samples} on a space of grid parameters only would run every "
                         "grid point that many times with the same seeds, giving the same result each time; to "
                         f"measure the spread over seeds use --seeds-per-trial {opts.num_samples} (each trial runs "
                         "that many seeds) with --num-samples 1")


def _check_options(space: SearchSpace, opts: SweepOptions) -> None:
    check_size(space, opts)
    check_no_repeats(space, opts)
    if opts.seeds_per_trial < 1:
        raise SpaceError("--seeds-per-trial must be >= 1")
    if opts.trial_retries < 0:
        raise SpaceError("--trial-retries must be >= 0")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise SpaceError("--max-concurrent must be >= 1")
    if opts.search == "grid" and any(p.kind not in ("grid", "choice") for p in space.params):
        raise SpaceError("--search grid needs every parameter as grid: or choice: (finite values)")
    if opts.search == "optuna":
        if any(p.kind == "grid" for p in space.params):
            raise SpaceError("--search optuna cannot expand grid: parameters; use choice: instead")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise PreflightError("--search optuna needs the optuna package: pip install 'inflora-ray[optuna]'") from None


def _options_record(opts: SweepOptions) -> dict:
    """The options that decide which trials a sweep runs and how it ranks them (recorded in sweep.json)."""
    return {k: getattr(opts, k) for k in ("num_samples", "scheduler", "search", "grace_period", "reduction_factor",
                                          "seeds_per_trial", "first_tasks")}  # max_trials: a guard, not a setting


def _check_resumed(sw: _Sweep) -> None:
    """``--resume`` must not change what the recorded sweep ran: its options (seeds per trial, horizon, search,
    scheduler, samples), its space and metric, and every config setting that alters results. Any difference is
    refused with the list of them, before anything is written or started. Keeps the record on ``sw`` for
    :func:`_open_parent`."""
    from ..ray_train.resume import result_changes

    name = sw.opts.name
    if not storage.exists(sw.dir.record):
        raise PreflightError(f"--resume: {sw.dir.path} holds no sweep.json: sweep {name!r} never started, or the "
                             "folder is not a sweep's; start it anew under another --name")
    sw.record = rec = storage.read_json(sw.dir.record)
    stored = rec.get("options", {})
    differ = [f"--{k.replace('_', '-')} {stored[k]} -> {v}" for k, v in _options_record(sw.opts).items()
              if k in stored and stored[k] != v]
    for key, now in (("space", sw.space.as_dict()), ("metric", sw.space.metric), ("mode", sw.space.mode)):
        if rec.get(key) != now:
            differ.append(f"--space {key}: {rec.get(key)!r} -> {now!r}")
    differ += [f"{k}: {a!r} -> {b!r}" for k, (a, b) in result_changes(rec.get("config", {}), sw.base).items()]
    if differ:
        raise PreflightError(f"--resume: sweep {name!r} would continue with settings its trials did not run with "
                             f"({'; '.join(differ)}); resume it with the command, preset, space and overrides it "
                             "was started with (its sweep.json holds them), or start a new sweep")


def _open_parent(sw: _Sweep) -> None:
    """The sweep's MLflow parent run: created, or on resume the one recorded in ``sweep.json``."""
    tracker, opts = sw.tracker, sw.opts
    if tracker is None:
        return
    if opts.resume and sw.record:
        if sw.record.get("mlflow_parent_run_id"):
            tracker.reopen(sw.record["mlflow_parent_run_id"])
        return
    tracker.create(opts.name, tags={"sweep": "parent", "selection_split": sw.base.data.eval_split}, params={
        "space": json.dumps(sw.space.as_dict()), "metric": sw.space.metric, "mode": sw.space.mode,
        "scheduler": opts.scheduler, "search": opts.search, "num_samples": opts.num_samples,
        "first_tasks": opts.first_tasks, "seeds_per_trial": opts.seeds_per_trial,
        "selection_split": sw.base.data.eval_split, "search_seeds": ",".join(map(str, sw.search_seeds)),
        "final_seeds": ",".join(map(str, sw.final_seeds)) if sw.runs_final else ""})


def _tuner(sw: _Sweep, study_storage=None):
    from ray import tune
    from ray.tune import RunConfig as TuneRunConfig
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ..ray_train.faults import FaultPlan, trial_fault_from_env
    from .trial import TrialPlan, run_trial
    from .hooks import TrialLines, TrialOutcomes, optuna_searcher

    base, opts = sw.base, sw.opts
    plan = TrialPlan(base=base.to_dict(), sweep=opts.name, trial_storage=sw.dir.trials_root,
                     parent_run_id=sw.parent_id, horizon=sw.horizon, seeds_per_trial=opts.seeds_per_trial,
                     exit_after_task=trial_fault_from_env(), run_fault=FaultPlan.from_env(), data=sw.data,
                     outcomes=sw.dir.outcomes)
    # The trial function only drives its runs' TorchTrainers, whose workers reserve their own resources.
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": 0.01})
    if opts.resume:
        # Tune starts every errored trial again (a trial has no Tune checkpoint: it resumes its seeds' runs
        # from their run directories); one that errored for a permanent cause fails again at once with its
        # recorded error, so only the transient ones are run again (trial.py).
        restore_path, restore_fs = storage.ray_storage(sw.dir.path)
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=restore_fs)
    sched = (ASHAScheduler(time_attr="tasks_done", max_t=sw.horizon, grace_period=opts.grace_period,
                           reduction_factor=opts.reduction_factor) if opts.scheduler == "asha" else FIFOScheduler())
    search_alg = (optuna_searcher(base.experiment.seed, sw.horizon, study_storage)
                  if opts.search == "optuna" else None)
    concurrency = default_concurrency(base, opts.seeds_per_trial, planned_trials(sw.space, opts.num_samples))
    if opts.max_concurrent is not None:
        concurrency = min(concurrency, opts.max_concurrent)
    ray_path, ray_fs = storage.ray_storage(base.run.storage_path)
    return tune.Tuner(
        trainable, param_space=sw.space.to_tune(),
        tune_config=tune.TuneConfig(metric=sw.space.metric, mode=sw.space.mode, scheduler=sched, search_alg=search_alg,
                                    num_samples=opts.num_samples, max_concurrent_trials=concurrency),
        run_config=TuneRunConfig(name=opts.name, storage_path=ray_path, storage_filesystem=ray_fs,
                                 failure_config=tune.FailureConfig(max_failures=opts.trial_retries),
                                 callbacks=[TrialOutcomes(opts.name, sw.dir.outcomes, sw.horizon),
                                            TrialLines(sw.horizon, sw.space.metric)],
                                 verbose=TUNE_VERBOSE if is_verbose() else TUNE_SILENT))


def run_sweep(cfg: Config, space: SearchSpace, opts: SweepOptions = SweepOptions()) -> dict:
    """Run a sweep; returns ``{"best_config": Config, "best_params", "best_metrics", "rows": [...],
    "final": RunResult | dict | None, ...}``.

    Raises :class:`~inflora_ray.ray_train.launch.RunInterrupted` when the sweep was interrupted before every
    trial ended (the message says how to resume it), ``RuntimeError`` when no trial completed."""
    _check_options(space, opts)
    if has_secrets(cfg.run.storage_path):
        # Ray Tune pickles its storage settings (path and filesystem, keys included) into the sweep's folder
        # (tuner.pkl), to be restored from there: a URI's credentials would be stored in the clear.
        raise PreflightError(f"run.storage_path={redact_uri(cfg.run.storage_path)!r}: a sweep's storage path cannot "
                             "carry credentials (Ray Tune would store them in the sweep's folder); give the store's "
                             "credentials through the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "GOOGLE_APPLICATION_CREDENTIALS, or the node's role) and the URI without them")
    # The trials run in other working directories, on any node: they get the storage path this driver checked,
    # made absolute here (as a run's workers get theirs), not one each would resolve against its own.
    cfg = cfg.with_values({"run.storage_path": check_config(cfg, opts.address)})
    benchmark = checked_benchmark(cfg)  # the sweep's one scan
    num_tasks = benchmark.num_tasks
    if opts.first_tasks is not None and not 1 <= opts.first_tasks <= num_tasks:
        raise PreflightError(f"--first-tasks {opts.first_tasks}: must be in 1..{num_tasks}")
    opts = replace(opts, name=opts.name or default_sweep_name(cfg))
    try:
        sweep = SweepDir.of(cfg.run.storage_path, opts.name)
    except ConfigError as e:
        raise SpaceError(f"--name: {e}") from None
    if opts.resume and not storage.exists(sweep.path):
        raise PreflightError(f"--resume: no sweep {opts.name!r} in {cfg.run.storage_path}")
    try:
        check_contained(sweep.path, "sweep")
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    if not opts.resume and storage.exists(sweep.path):
        raise PreflightError(f"sweep {opts.name!r} already exists in {cfg.run.storage_path}; use --resume or another --name")
    # Trials checkpoint at task boundaries only, and log to the store this driver resolved (trials run in
    # other working directories, on other nodes, without the driver's environment).
    base = cfg.with_values({"run.checkpoint_every_epochs": 0, "run.name": None, "tracking.sweep_id": opts.name})
    if base.run.max_failures == 0:
        # A worker lost to a passing fault (a preempted node, a storage error whose retries ran out) restarts
        # from the run's last checkpoint instead of failing the trial; errors no restart can fix still end
        # the run at once (the fatal marker).
        base = base.with_values({"run.max_failures": SWEEP_RUN_MAX_FAILURES})
    if base.data.val_fraction is None:
        base = base.with_values({"data.val_fraction": SWEEP_VAL_FRACTION})
    if cfg.tracking.enabled:
        from ..tracking.store import pin_uri, resolve_uri

        base = base.with_values({"tracking.uri": pin_uri(resolve_uri(base))})
    sw = _Sweep(cfg, base, space, sweep, opts, num_tasks, scanned=benchmark.scanned)
    if opts.resume:
        _check_resumed(sw)
    sw.tracker = start_tracker(base)
    join_cluster(base, opts.address)
    if not get_benchmark(cfg.data.benchmark).in_memory:  # trials build their runs from it, not a rescan
        import ray

        sw.data = ray.put(benchmark.scanned)

    if not opts.resume:
        try:
            sweep.claim()
        except RunClaimed as e:
            raise PreflightError(f"{e}; use --resume or another --name") from None
    _open_parent(sw)
    if not opts.resume:
        storage.write_json(sweep.record, {"name": opts.name, "mlflow_parent_run_id": sw.parent_id,
                                          "space": space.as_dict(), "metric": space.metric, "mode": space.mode,
                                          "first_tasks": opts.first_tasks, "seeds_per_trial": opts.seeds_per_trial,
                                          "horizon": sw.horizon, "options": _options_record(opts),
                                          "selection_split": base.data.eval_split, "search_seeds": sw.search_seeds,
                                          "final_seeds": sw.final_seeds if sw.runs_final else None,
                                          "config": redact_config(base).to_dict()})
    log_event(log, "sweep_start", name=opts.name, trials=planned_trials(space, opts.num_samples),
              scheduler=opts.scheduler, search=opts.search, metric=space.metric, horizon=sw.horizon,
              seeds_per_trial=opts.seeds_per_trial, resume=opts.resume)
    trials = planned_trials(space, opts.num_samples)
    print(redact_text(f"{'resuming sweep' if opts.resume else 'sweep'} {opts.name}: {trials} trial(s) x "
                      f"{opts.seeds_per_trial} seed(s) x {sw.horizon} task(s) = {trials * opts.seeds_per_trial} runs "
                      f"at most ({opts.search} search, {opts.scheduler}), ranked on {space.metric} "
                      f"{_split_words(sw)}; trials' runs in {sweep.trials_root}"), flush=True)
    if not sw.held_out:
        print("warning: data.val_fraction is 0: the trials are ranked on the test set, so the winner's test "
              "accuracy is optimistic; leave data.val_fraction unset (a sweep then holds out "
              f"{SWEEP_VAL_FRACTION:g} of the training data) to rank on held-out images", file=sys.stderr, flush=True)
    if sw.tracker is not None:
        from ..ray_train.launch import print_runs_page

        print_runs_page(sw.tracker)
    from .hooks import end_open_runs, register_tracker

    register_tracker(opts.name, sw.tracker)
    study_storage = _study_storage(opts)
    try:
        with _sigterm_stops_tune(), _own_resume_hint():
            results = _tuner(sw, study_storage).fit()
        out = _conclude(sw, results)
    except BaseException as e:
        if sw.tracker is not None and not sw.parent_closed:
            end_open_runs(opts.name, "KILLED", f"sweep stopped: {type(e).__name__}: {e}")
            # A resume that fails leaves a finished sweep's parent as it was: its results stand.
            finished = opts.resume and sw.tracker.reopened_from == "FINISHED"
            sw.tracker.finish_parent({}, status="FINISHED" if finished else
                                     "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        register_tracker(opts.name, None)
    if study_storage is not None:
        import optuna

        out["optuna_study"] = optuna.load_study(study_name="sweep", storage=study_storage)
    return out


def _split_words(sw: _Sweep) -> str:
    """What the trials are ranked on, in words."""
    if sw.held_out:
        return (f"on validation images ({sw.base.data.val_fraction:g} of each class's training images held out, "
                f"data.val_seed {sw.base.data.val_seed})")
    return "on the test set"


@contextlib.contextmanager
def _sigterm_stops_tune():
    """While Ray Tune runs the trials, SIGTERM (``ray job stop``) ends the sweep as Ctrl-C does: Tune stops
    its trials and saves its state, the sweep ends its trials' runs and its parent run KILLED and says how to
    resume. (Ray's own SIGTERM handler on a driver exits at once: the parent run would end FAILED.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        on_interrupt = signal.getsignal(signal.SIGINT)  # Tune's graceful stop while fit() runs
        if callable(on_interrupt) and on_interrupt is not signal.default_int_handler:
            on_interrupt(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _WithoutTunesResumeHint(logging.Filter):
    """Drops Ray Tune's "Resume experiment with: Tuner.restore(...)" after an interrupt: a sweep is resumed with
    its own command (``--name NAME --resume``), which the sweep prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


@contextlib.contextmanager
def _own_resume_hint():
    tune_log, hint_filter = logging.getLogger("ray.tune.tune"), _WithoutTunesResumeHint()
    tune_log.addFilter(hint_filter)
    try:
        yield
    finally:
        tune_log.removeFilter(hint_filter)


def _study_storage(opts: SweepOptions):
    """Where an Optuna sweep's study lives during the run (in memory; Tune saves it with the sweep)."""
    if opts.search != "optuna" or opts.resume:
        return None
    import optuna

    return optuna.storages.InMemoryStorage()


def _conclude(sw: _Sweep, results) -> dict:
    """Close every trial's MLflow runs with its true status, write the trial table, name the winner (a trial
    that completed the horizon), write its config, run it over all tasks if asked, close the parent run."""
    from ..ray_train.launch import RunInterrupted
    from .hooks import TrialOutcomes, end_trial_runs

    space, opts, sweep = sw.space, sw.opts, sw.dir
    rows = trial_table(results, space, sw.horizon, TrialOutcomes(opts.name, sweep.outcomes, sw.horizon).read())
    for row in rows:  # what the trials' metrics were measured on
        row["eval_split"] = sw.base.data.eval_split
    write_trial_table(sweep, rows)
    end_trial_runs(opts.name, {r["trial_id"]: {"outcome": r["status"], "error": r["error"]} for r in rows})
    _print_table(sw, rows)
    unfinished = [r["trial_id"] for r in rows if r["status"] == "unfinished"]
    if unfinished:
        sw.close_parent("KILLED", files=sweep.table_files)
        raise RunInterrupted(f"sweep {opts.name!r} was interrupted with {len(unfinished)} trial(s) unfinished; "
                             f"continue it with the same command and --name {opts.name} --resume")
    try:
        best = select_best(rows, space.metric, space.mode)
    except RuntimeError:
        sw.close_parent("FAILED", files=sweep.table_files)
        raise
    best_params = {p.key: best[f"param.{p.key}"] for p in space.params}
    # The best config trains on all the training data and is evaluated on the test set (no held-out part).
    best_cfg = redact_config(sw.cfg).with_values({**best_params, "run.name": None, "data.val_fraction": None})
    storage.write_bytes(sweep.best_config, best_cfg.to_yaml().encode())
    print(f"best: trial {best['trial_id']} (completed every task), {space.metric} {best[space.metric]:.4f} "
          f"{_split_words(sw)}; config: {sweep.best_config}  params {best_params}")
    final = _run_final(sw, best_cfg) if sw.runs_final else None
    metrics = {f"best_{space.metric}": float(best[space.metric])}
    if not math.isnan(best.get(f"{space.metric}_std", math.nan)):
        metrics[f"best_{space.metric}_std"] = float(best[f"{space.metric}_std"])
    if final is not None:
        metrics["final_run_final_accuracy"] = float(final["final_accuracy"])
        if final.get("final_accuracy_task_mean") is not None:
            metrics["final_run_final_accuracy_task_mean"] = float(final["final_accuracy_task_mean"])
    errored = errored_trials(rows)
    metrics["trials_errored"] = len(errored)
    sw.close_parent("FINISHED", metrics, files=(*sweep.table_files, sweep.best_config))
    if errored:
        print(errored_summary(rows), file=sys.stderr, flush=True)
    best_metrics = {k: v for k, v in best.items() if k not in ("trial_id", "status", "error")
                    and not k.startswith("param.")}
    return {"name": opts.name, "sweep_dir": sweep.path, "best_config": best_cfg, "best_params": best_params,
            "best_trial": best["trial_id"], "best_metrics": best_metrics, "rows": rows, "final": final,
            "selection_split": sw.base.data.eval_split, "final_seeds": sw.final_seeds if final is not None else None,
            "mlflow_parent_run_id": sw.parent_id, "results": results, "errored": [r["trial_id"] for r in errored]}


def errored_trials(rows: list[dict]) -> list[dict]:
    """The rows of the trials that ended with an error (they never compete for the winner)."""
    return [r for r in rows if r["status"] == "error"]


def errored_summary(rows: list[dict]) -> str:
    """What to tell the user about a sweep that named a winner while some trials ended with an error: how
    many, each one's id and error, and that the winner was chosen without them."""
    errored = errored_trials(rows)
    lines = [f"warning: {len(errored)} of {len(rows)} trial(s) ended with an error and took no part in choosing "
             "the winner (the trial table lists them):"]
    lines += [f"  {r['trial_id']}{' (' + r['cause'] + ')' if r.get('cause') else ''}: {r['error'] or 'no message'}"
              for r in errored]
    transient = sum(r.get("cause") == "transient" for r in errored)
    if transient:
        lines.append(f"{transient} of them failed for a transient cause: the same command with --name and --resume "
                     "runs them again")
    return redact_text("\n".join(lines))


def _print_table(sw: _Sweep, rows: list[dict]) -> None:
    metric = sw.space.metric
    print(f"\n== sweep {sw.opts.name}: {len(rows)} trial(s), {sw.opts.seeds_per_trial} seed(s) each, "
          f"ranked on {metric} after all {sw.horizon} tasks {_split_words(sw)} ==")
    for row in rows:
        params = ", ".join(f"{k[6:]}={row[k]}" for k in row if k.startswith("param."))
        spread = f" +- {row[metric + '_std']:.4f}" if sw.opts.seeds_per_trial > 1 and f"{metric}_std" in row else ""
        error = f"  [{row['cause']}] {row['error']}" if row.get("cause") else f"  {row['error']}"
        print(f"  {row['trial_id']}: {row['status']:10s} tasks {row['tasks_done']}/{sw.horizon}  "
              f"{metric} {row.get(metric, math.nan):.4f}{spread}  ({params}){error if row['error'] else ''}")


def _run_final(sw: _Sweep, best_cfg: Config) -> dict:
    """The winner run again over every task, trained on all the training data and evaluated on the test set,
    with :attr:`_Sweep.final_seeds` (fresh seeds after held-out selection); returns its summary (means over
    the seeds as ``final_accuracy`` etc. with more than one seed)."""
    from ..ray_train.launch import RunContext, RunOptions, run_experiment
    from ..ray_train.seeds import run_seeds

    seeds = sw.final_seeds
    fresh = " (seeds the search did not use)" if sw.held_out else ""
    print(f"final run(s): the best config over all {sw.num_tasks} tasks on the test set, seed(s) "
          f"{', '.join(map(str, seeds))}{fresh}", flush=True)
    cfg = restore_credentials(best_cfg, sw.cfg).with_values({"tracking.sweep_id": sw.opts.name,
                                                             "tracking.uri": sw.base.tracking.uri})
    opts = RunOptions(name=f"{sw.opts.name}-final", address=sw.opts.address)
    if len(seeds) == 1:
        context = RunContext(parent_run_id=sw.parent_id, label="[final] ", data=sw.scanned)
        return run_experiment(cfg.with_values({"experiment.seed": seeds[0]}), opts, context).summary
    agg = run_seeds(cfg, seeds, opts, RunContext(data=sw.scanned))["aggregate"]
    return {k[:-5]: v for k, v in agg.items() if k.endswith("_mean")}
