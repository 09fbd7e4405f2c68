"""What a sweep adds to Ray Tune: a file saying how each trial ended, MLflow runs that end with that status, the
sweep's console lines, and an Optuna searcher that learns "pruned" (not a score) from trials the scheduler
stopped.

Imported by :mod:`.sweep` only when a sweep starts (it imports Ray Tune).
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Optional

from ray import tune

from .. import storage
from ..logs import log_event
from ..rundir import split_run_name
from ..tracking.mlflow_runs import END_REASON_TAG

log = logging.getLogger(__name__)

# How a trial ended, and the MLflow status its runs end with.
OUTCOME_STATUS = {"completed": "FINISHED", "pruned": "KILLED", "error": "FAILED", "unfinished": "KILLED"}

# The MLflow parent tracker of each sweep running in this process, by sweep name. Kept here, not in the
# callback, because Tune pickles its callbacks into the sweep's folder and the tracker holds the tracking
# URI's credentials.
_TRACKERS: dict[str, object] = {}
_LOCK = threading.Lock()


def register_tracker(sweep: str, tracker) -> None:
    """Let the callbacks of sweep ``sweep`` close its trials' MLflow runs through ``tracker`` (None: none)."""
    with _LOCK:
        if tracker is None:
            _TRACKERS.pop(sweep, None)
        else:
            _TRACKERS[sweep] = tracker


def trial_run_names(trial_id: str, names: list[str]) -> list[str]:
    """The runs of trial ``trial_id`` among run names: ``<trial_id>`` or ``<trial_id>-seed<k>``
    (:func:`~inflora_ray.rundir.split_run_name`)."""
    return [n for n in names if split_run_name(n)[0] == trial_id]


def end_trial_runs(sweep: str, outcomes: dict[str, dict]) -> int:
    """Give the MLflow runs of the trials in ``outcomes`` ({trial_id: {"outcome", "error"?}}) the status and
    ``end_reason`` of their trial's outcome. Runs still RUNNING are always ended (a run cut off by Tune's stop
    leaves its status to this, see :class:`.trial.TrialStop`). The runs of a pruned or unfinished trial are
    set KILLED whatever they wrote last (a run that failed before the stop); a failed trial's runs keep their
    own status and error. Returns how many runs were changed (0 without tracking)."""
    tracker = _TRACKERS.get(sweep)
    if tracker is None or tracker.run_id is None:
        return 0
    changed = 0
    # One trial (as each trial ends): search only its runs; the sweep's end pass reads all children once.
    prefix = next(iter(outcomes)) if len(outcomes) == 1 else None
    for child in tracker.child_runs(name_prefix=prefix):
        for trial_id, rec in outcomes.items():
            if not trial_run_names(trial_id, [child.info.run_name]):
                continue
            status, reason = OUTCOME_STATUS[rec["outcome"]], rec.get("error") or rec["outcome"]
            stopped = rec["outcome"] in ("pruned", "unfinished") and (
                child.info.status != status or child.data.tags.get(END_REASON_TAG) != reason)
            if child.info.status == "RUNNING" or stopped:
                tracker.end_run(child.info.run_id, status, reason=reason)
                changed += 1
    return changed


def end_open_runs(sweep: str, status: str, reason: str) -> int:
    """End every trial run of sweep ``sweep`` still RUNNING with ``status`` (the sweep itself stopped)."""
    tracker = _TRACKERS.get(sweep)
    if tracker is None or tracker.run_id is None:
        return 0
    open_runs = [c for c in tracker.child_runs() if c.info.status == "RUNNING"]
    for child in open_runs:
        tracker.end_run(child.info.run_id, status, reason=reason)
    return len(open_runs)


class TrialOutcomes(tune.Callback):
    """Records how each trial ended in the sweep's ``trial_outcomes.json``: ``completed`` (reached the
    horizon), ``pruned`` (stopped by the scheduler before it), ``error`` (with the error's last line); and
    ends the trial's MLflow runs with FINISHED / KILLED / FAILED. Runs on the sweep's driver."""

    def __init__(self, sweep: str, path: str, horizon: int):
        self.sweep, self.path, self.horizon = sweep, path, horizon

    def read(self) -> dict[str, dict]:
        """{trial_id: {"outcome", "tasks_done", "error"?}} recorded so far (this and earlier attempts)."""
        return storage.read_json(self.path) if storage.exists(self.path) else {}

    def _record(self, trial, outcome: str, error: Optional[str] = None) -> None:
        rec = {"outcome": outcome, "tasks_done": _tasks_done(trial), **({"error": error} if error else {})}
        with _LOCK:
            states = self.read()
            states[trial.trial_id] = rec
            storage.write_json(self.path, states)
        log_event(log, "trial_end", trial=trial.trial_id, **rec)
        try:
            end_trial_runs(self.sweep, {trial.trial_id: rec})
        except Exception as e:  # MLflow trouble never stops a sweep; the sweep's end tries again
            log_event(log, "trial_runs_not_closed", level=logging.WARNING, trial=trial.trial_id, error=str(e)[:300])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, ended_as(trial, self.horizon))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "error", _last_line(trial.get_error()))


def _tasks_done(trial) -> int:
    return int((trial.last_result or {}).get("tasks_done", 0) or 0)


def ended_as(trial, horizon: int) -> str:
    """How a trial that Tune completed ended: ``completed`` (every task of the horizon) or ``pruned``."""
    return "completed" if _tasks_done(trial) >= horizon else "pruned"


class TrialLines(tune.Callback):
    """The sweep's console, a line each: a trial starts (with its sampled values), a trial finishes a task (the
    means over its seeds of ``metric``, the sweep's ranking metric, and of the pooled accuracy), a trial ends
    (completed, pruned, failed). Runs on the sweep's driver; with ``--verbose`` Ray Tune's own status tables
    are shown as well."""

    def __init__(self, horizon: int, metric: str):
        self.horizon, self.metric = horizon, metric

    def on_trial_start(self, iteration, trials, trial, **info):
        values = ", ".join(f"{k}={v}" for k, v in (trial.config or {}).items())
        print(f"trial {trial.trial_id} started: {values}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "tasks_done" not in result:
            return
        keys = [self.metric] + [k for k in ("pooled_accuracy",) if k != self.metric]
        figures = "  ".join(f"{k} {result[k]:.4f}" if k == "train_loss" else f"{k} {100 * result[k]:.2f}%"
                            for k in keys if isinstance(result.get(k), (int, float)))
        seeds = int(result.get("seeds", 1) or 1)
        print(f"[trial {trial.trial_id}] task {result['tasks_done']}/{self.horizon}  {figures}"
              f"{f'  (mean of {seeds} seeds)' if seeds > 1 else ''}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        outcome = ended_as(trial, self.horizon)
        print(f"trial {trial.trial_id} {outcome} after {_tasks_done(trial)}/{self.horizon} tasks", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} failed after {_tasks_done(trial)}/{self.horizon} tasks: "
              f"{_last_line(trial.get_error())}", file=sys.stderr, flush=True)


def _last_line(err) -> str:
    lines = [ln.strip() for ln in str(err or "unknown error").splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


def optuna_searcher(seed: int, horizon: int, study_storage=None):
    """Ray's Optuna searcher, except that a trial the scheduler stopped before the horizon is told to the
    study as PRUNED (Ray would record its last, early, value as a completed score). ``study_storage``: an
    ``optuna.storages`` object to keep the study in (default: in memory)."""
    from ray.tune.search.optuna import OptunaSearch

    class HorizonOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id, result=None, error=False):
            if not error and result and int(result.get("tasks_done", 0) or 0) < horizon:
                result = None  # no value and no error: OptunaSearch tells the study PRUNED
            super().on_trial_complete(trial_id, result=result, error=error)

    return HorizonOptunaSearch(seed=seed, storage=study_storage, study_name="sweep")
