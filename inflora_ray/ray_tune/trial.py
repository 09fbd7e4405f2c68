"""One Ray Tune trial of a sweep: the sampled config run with K seeds (K continual runs side by side), whose
per-task results are averaged over the seeds and sent to Tune once every seed has finished that task.

The means after the sweep's last task are sent only after every seed's run has ended (results written,
MLflow run closed), so Tune's stop at the end of the horizon never cuts a run short.

When a seed's run fails, the trial fails with a cause (:func:`failure_cause`, in its error's message):

- **permanent**: an error no restart can fix (the run's fatal marker, :mod:`..ray_train.errors`; a bad
  sample or config). The trial's other seeds are stopped at once (their runs end ``interrupted``, never
  ``failed``), and a retry of the trial (Tune's ``--trial-retries``, a sweep's ``--resume``) fails at once
  with the recorded error, starting nothing.
- **transient**: the run's Ray Train restarts (``run.max_failures``) were spent on errors that pass (a store
  down longer than its retries, lost nodes), or anything else that is not known to be permanent. The other
  seeds go on (their work is kept); a retry of the trial resumes the failed seed's run from its last task
  checkpoint, and resumes the other seeds' runs or re-sends their results.

A trial that Tune restarts (its process or node was lost) likewise resumes each seed's run from its last
task checkpoint.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import re
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from .. import storage
from ..config import Config, ConfigError, config_from_dict
from ..logs import log_event, setup_logging
from ..preflight import PreflightError
from ..ray_train.errors import NonRetryableError, fatal_message, read_fatal
from ..ray_train.faults import ENV_VAR as RUN_FAULT_ENV_VAR
from ..ray_train.faults import exit_trial_once
from ..ray_train.launch import RunContext, RunInterrupted, RunOptions, RunStopped, run_experiment
from ..results import RESULT, read_metrics, read_task_result
from ..rundir import RunDir, run_name
from ..training.state import task_metrics
from .search_space import SpaceError, check_sample

log = logging.getLogger(__name__)

# Metrics sent with their spread over the seeds (``<name>_std``), beside the mean.
SPREAD_METRICS = ("pooled_accuracy", "average_incremental_accuracy", "task_mean_accuracy",
                  "average_incremental_accuracy_task_mean", "forgetting", "backward_transfer")


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep runs (the trial's sample is the only thing that differs)."""
    base: dict  # the sweep's base config, as a dict
    sweep: str  # the sweep's name (MLflow tag sweep_id)
    trial_storage: str  # where the trials' run directories live
    parent_run_id: Optional[str]  # the sweep's MLflow parent run
    horizon: int  # tasks each trial runs
    seeds_per_trial: int = 1
    exit_after_task: Optional[int] = None  # tests: a trial's process exits after this task, once per sweep
    run_fault: Optional[str] = None  # tests: the driver's INFLORA_RAY_FAULT, for the trials' runs
    outcomes: Optional[str] = None  # the sweep's trial_outcomes.json (how each trial ended so far)
    data: Any = None  # the sweep driver's scan of the dataset (a Ray ObjectRef): trials do not rescan it

    def seeds(self, cfg: Config) -> list[int]:
        """The trial's seeds: ``experiment.seed``, +1, ..., the same for every trial (paired comparison)."""
        return [cfg.experiment.seed + k for k in range(self.seeds_per_trial)]

    def run_name(self, trial_id: str, seed: int) -> str:
        """The run directory / MLflow run name of one seed of a trial: the trial id, with ``-seed<k>``
        (:func:`~inflora_ray.rundir.run_name`) when the trial runs several seeds."""
        return run_name(trial_id, None if self.seeds_per_trial == 1 else seed)


def mean_over_seeds(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds of every metric (NaN where a seed has none yet, e.g. forgetting after task 1), and the
    sample std of :data:`SPREAD_METRICS` as ``<name>_std`` (0 with one seed)."""
    keys = sorted(set().union(*per_seed))
    out = {}
    for k in keys:
        vals = [m[k] for m in per_seed if k in m and not math.isnan(m[k])]
        every_seed = len(vals) == len(per_seed)
        out[k] = statistics.fmean(vals) if every_seed else math.nan
        if k in SPREAD_METRICS:
            out[f"{k}_std"] = (statistics.stdev(vals) if len(vals) > 1 else 0.0) if every_seed else math.nan
    return out


TRANSIENT, PERMANENT = "transient", "permanent"
# How often a seed's run looks for its siblings' fatal markers: in a local folder, and on an object store (each
# look is a request per sibling, billed and rate-limited; the failed sibling's own end stops the trial anyway).
FATAL_LOOK_SECONDS, FATAL_LOOK_SECONDS_ON_STORE = 1.0, 10.0
# Errors that come back on every attempt: a worker's fatal marker (NonRetryableError), a bad sample or config,
# a run refused before it started.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (NonRetryableError, ConfigError, SpaceError, PreflightError)


def failure_cause(error: BaseException) -> str:
    """``permanent`` for an error no retry can fix (:data:`PERMANENT_ERRORS`), else ``transient`` (a run
    whose Ray Train restarts were spent on errors that pass, a lost store or node): a retry may succeed."""
    return PERMANENT if isinstance(error, PERMANENT_ERRORS) else TRANSIENT


class TrialFailed(RuntimeError):
    """A trial's seed failed; ``cause`` is ``transient`` or ``permanent``. The message is one line (the trial
    table shows an error's last line) and names the cause as ``failed (<cause>)``, which the sweep's driver
    reads back from Tune's record of the error (:func:`error_cause`)."""

    def __init__(self, message: str, cause: str = PERMANENT):
        super().__init__(message)
        self.cause = cause

    def __reduce__(self):  # Tune copies and pickles a trial's error
        return type(self), (str(self), self.cause)


# The cause a trial's error names, and the errors of a lost trial process (Ray's names).
_CAUSE = re.compile(r"failed \((transient|permanent)\)")
_LOST_PROCESS = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "NodeDiedError", "OwnerDiedError",
                 "WorkerCrashedError")


def error_cause(error) -> str:
    """``transient`` or ``permanent``: the cause a trial's error (its text, as Tune recorded it) names
    (``failed (<cause>)``, see :func:`trial_error`); a trial whose process or node was lost is ``transient``;
    any other error (one the trial did not classify) ``permanent``, so that a ``--resume`` does not run it
    again."""
    text = str(error or "")
    found = _CAUSE.findall(text)
    if found:
        return found[-1]
    return TRANSIENT if any(k in text for k in _LOST_PROCESS) else PERMANENT


def history_text(rec: dict) -> str:
    """A trial outcome's history in one line (the trial table's ``earlier`` column): the errors Tune retried
    it after, then its earlier outcomes (a ``--resume`` that ended it differently); empty when none."""
    parts = [f"retried after: {e}" for e in rec.get("retried_after", [])]
    for e in rec.get("earlier", []):
        what = f"{e.get('outcome')} after {e.get('tasks_done', 0)} task(s)"
        parts.append(f"{what} ({e.get('cause', '?')}): {e.get('error', '')}" if e.get("outcome") == "error" else what)
    return " | ".join(parts)


# A line "module.Name: message" naming an exception, as in the worker's traceback a run's error carries.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Fault|Exit)): (.+)$")


def _first_line(error: BaseException) -> str:
    """The error's first line, and when its text goes on to a worker's traceback (a run whose restarts were
    spent), the worker's exception: the one line that says what happened."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    causes = [m for m in map(_EXCEPTION_LINE.match, lines[1:]) if m]
    if causes:
        first += f" (worker: {causes[-1].group(1)}: {causes[-1].group(2)})"
    return first[:500]


def trial_error(trial_id: str, errors: dict[int, BaseException]) -> TrialFailed:
    """The trial's error from its seeds' ones: the first permanent failure, else the first other failure
    (seeds whose runs were stopped because of it are named, not reported as failures)."""
    failed = {s: e for s, e in errors.items() if not isinstance(e, RunInterrupted)} or errors
    seed, err = min(failed.items(), key=lambda kv: (failure_cause(kv[1]) != PERMANENT, kv[0]))
    cause = failure_cause(err)
    text = f"trial {trial_id} failed ({cause}): seed {seed}: {type(err).__name__}: {_first_line(err)}"
    others = sorted(s for s in failed if s != seed)
    stopped = sorted(s for s in errors if s not in failed)
    if others:
        text += f"; seed(s) {others} failed too"
    if stopped:
        text += f"; seed(s) {stopped} stopped with it (resumable)"
    return TrialFailed(text, cause)


def recorded_permanent_error(outcomes: Optional[str], trial_id: str) -> Optional[str]:
    """The error of trial ``trial_id`` if the sweep recorded that it ended with a permanent error (a
    ``--resume`` re-runs errored trials: this one fails again at once, with the same message), else None."""
    if outcomes is None or not storage.exists(outcomes):
        return None
    rec = storage.read_json(outcomes).get(trial_id) or {}
    if rec.get("outcome") != "error" or rec.get("cause", error_cause(rec.get("error"))) != PERMANENT:
        return None
    error = str(rec.get("error") or "no message")
    start = error.find(f"trial {trial_id} failed (")  # without the exception's qualified name before it
    return error[start:] if start >= 0 else f"trial {trial_id} failed ({PERMANENT}): {error}"


def earlier_permanent_failure(run: RunDir) -> Optional[NonRetryableError]:
    """The error with which a seed's run failed for good in an earlier attempt of this trial (its fatal
    marker), or None. Such a run is never run again: a retry could only repeat the error."""
    record = read_fatal(run)
    if record is None:
        return None
    return NonRetryableError(f"run {run.name!r}: {fatal_message(record)}")  # as the run's driver raised it


class TrialStop:
    """Whether the trial's runs must stop: Ray Tune has asked the trial running in this process to stop (its
    scheduler stopped it, or the sweep is stopping), or one of its seeds failed for good
    (:meth:`stop_seeds`); the trial sends its metrics through :meth:`send`.

    Tune asks a trial to stop between two of its results, while the trial's thread waits in
    ``ray.tune.report``, which then leaves with ``SystemExit``. That happens before Tune removes the trial's
    resources, which kills the Ray Train controllers of the trial's runs: a run that fails once
    :meth:`requested` is true was cut off by the stop."""

    def __init__(self, runs: Optional[dict[int, RunDir]] = None):
        self._stopped = threading.Event()
        self._seeds_stopped = threading.Event()
        self._runs = runs or {}
        self._looked: dict[int, float] = {}  # when each seed last looked for its siblings' fatal markers

    def send(self, metrics: dict) -> None:
        """Hand ``metrics`` to Tune (``ray.tune.report``), noting the ``SystemExit`` by which Tune ends a trial
        it stops."""
        import ray.tune

        try:
            ray.tune.report(metrics)
        except SystemExit:
            self._stopped.set()
            raise

    def requested(self) -> bool:
        """True once Tune has asked this trial to stop, or a seed failed for good."""
        return self._stopped.is_set() or self._seeds_stopped.is_set()

    def stop_seeds(self) -> None:
        """Ask every run of the trial to stop now (one seed failed for good: the trial has failed)."""
        self._seeds_stopped.set()

    def for_seed(self, seed: int):
        """What the run of ``seed`` asks to know whether it must stop: :meth:`requested`, or another seed's
        worker has recorded an error no restart can fix (its fatal marker, looked for at most every
        :data:`FATAL_LOOK_SECONDS`, :data:`FATAL_LOOK_SECONDS_ON_STORE` on an object store): the trial has
        failed, without waiting for that run's driver to end."""
        others = [run for s, run in self._runs.items() if s != seed]
        every = FATAL_LOOK_SECONDS_ON_STORE if any(storage.is_uri(run.path) for run in others) else FATAL_LOOK_SECONDS
        seen = threading.Event()  # once true, true for good (the run's driver asks again after the abort)

        def requested() -> bool:
            if self.requested() or seen.is_set():
                return True
            now = time.monotonic()
            if not others or now - self._looked.get(seed, 0.0) < every:
                return False
            self._looked[seed] = now
            try:
                if any(storage.exists(run.fatal_marker) for run in others):
                    seen.set()
            except OSError:  # the store is down: look again later
                pass
            return seen.is_set()

        return requested


def run_trial(params: dict, *, plan: TrialPlan) -> None:
    """The Tune trainable: run the sampled config with the plan's seeds and send per-task means to Tune."""
    import ray.tune

    setup_logging()
    trial_id = ray.tune.get_context().get_trial_id()
    if plan.run_fault:  # tests: Ray started this process without the driver's environment
        os.environ[RUN_FAULT_ENV_VAR] = plan.run_fault
    recorded = recorded_permanent_error(plan.outcomes, trial_id)
    if recorded is not None:
        raise TrialFailed(recorded, PERMANENT)
    try:
        cfg = check_sample(config_from_dict(plan.base), params)
    except SpaceError as e:
        raise TrialFailed(f"trial {trial_id} failed ({PERMANENT}): {_first_line(e)}", PERMANENT) from None
    cfg = cfg.with_values({"run.storage_path": plan.trial_storage, "tracking.sweep_id": plan.sweep})
    seeds = plan.seeds(cfg)
    runs = {seed: RunDir(storage.join(plan.trial_storage, plan.run_name(trial_id, seed))) for seed in seeds}
    # A retry (Tune's, or a sweep's --resume) of a trial one of whose seeds failed for good fails at once, with
    # that seed's recorded error: nothing is started (a stopped sibling stays resumable as it is).
    for seed, run in runs.items():
        earlier = earlier_permanent_failure(run) if storage.exists(run.config) else None
        if earlier is not None:
            raise trial_error(trial_id, {seed: earlier})
    stop = TrialStop(runs)
    results: queue.Queue = queue.Queue()
    errors: dict[int, BaseException] = {}

    def one(seed: int) -> None:
        run = runs[seed]
        try:
            if stop.requested():  # another seed failed for good before this one started
                raise RunStopped("stopped before it started: another seed of the trial failed for good")
            resume = storage.exists(run.config)  # Tune restarted this trial: continue from the last checkpoint
            if resume:
                metrics = read_metrics(run)  # read once: finished already?
                if metrics is not None and metrics.get("status") == "failed":
                    # failed for a transient cause (a permanent failure was refused above): resumed
                    log_event(log, "trial_run_resumed_after_failure", trial=trial_id, run=run.name,
                              tasks_done=metrics.get("complete"))
                for t in run.finished_tasks():  # sent again: the restarted trial's Tune session starts empty
                    results.put((seed, read_task_result(run, t)))
                if metrics is not None and metrics.get("complete", 0) >= plan.horizon:
                    return
            run_experiment(cfg.with_values({"experiment.seed": seed}),
                           RunOptions(name=run.name, resume=resume, stop_after_task=plan.horizon - 1),
                           RunContext(parent_run_id=plan.parent_run_id, quiet_table=True, label=f"[{run.name}] ",
                                      on_task=lambda rec: results.put((seed, rec)), data=plan.data,
                                      stop_requested=stop.for_seed(seed), sole_driver=True))
        except BaseException as e:  # raised by the trial thread once every seed has ended
            if isinstance(e, RunInterrupted):  # stopped; its own worker may have failed for good before that
                e = earlier_permanent_failure(run) or e
            errors[seed] = e
            # A permanent failure fails the trial whatever the other seeds do: stop them now. A transient
            # one leaves them running, so that a retry of the trial only has the failed seed to resume.
            if failure_cause(e) == PERMANENT:
                stop.stop_seeds()

    threads = [threading.Thread(target=one, args=(s,), name=f"seed-{s}", daemon=True) for s in seeds]
    for t in threads:
        t.start()
    send = stop.send
    if plan.exit_after_task is not None:
        marker = storage.join(plan.trial_storage, "trial.fault")

        def send(metrics: dict) -> None:
            stop.send(metrics)
            if metrics["tasks_done"] == plan.exit_after_task + 1:
                exit_trial_once(marker, plan.exit_after_task)

    _send_as_tasks_finish(results, threads, seeds, plan.horizon, send)
    if errors:
        err = trial_error(trial_id, errors)
        raise err from errors[min(errors)]


def _send_as_tasks_finish(results: queue.Queue, threads: list[threading.Thread], seeds: list[int],
                          horizon: int, send) -> None:
    """Send task t's mean over seeds to Tune as soon as every seed has finished it, in task order; the last
    task's mean waits until every seed's run has ended."""
    per_task: dict[int, dict[int, dict[str, float]]] = {}
    next_task = 0

    def drain(block: bool) -> None:
        try:
            while True:
                seed, rec = results.get(timeout=0.5) if block else results.get_nowait()
                block = False
                per_task.setdefault(int(rec[RESULT]["task"]), {})[seed] = task_metrics(rec[RESULT], finite_only=False)
        except queue.Empty:
            pass

    while any(t.is_alive() for t in threads):
        drain(block=True)
        while next_task < horizon - 1 and len(per_task.get(next_task, {})) == len(seeds):
            send(_task_means(per_task[next_task], next_task, seeds))
            next_task += 1
    for t in threads:
        t.join()
    drain(block=False)
    while next_task < horizon and len(per_task.get(next_task, {})) == len(seeds):
        send(_task_means(per_task[next_task], next_task, seeds))
        next_task += 1


def _task_means(by_seed: dict[int, dict[str, float]], task: int, seeds: list[int]) -> dict:
    return {**mean_over_seeds([by_seed[s] for s in seeds]), "task": task, "tasks_done": task + 1,
            "seeds": len(seeds)}
