"""What a sweep adds to Ray Tune: a file saying how each trial ended, MLflow runs that end with that status, the
sweep's console lines, and an Optuna searcher that learns "pruned" (not a score) from trials the scheduler
stopped.

Imported by :mod:`.sweep` only when a sweep starts (it imports Ray Tune).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Optional

from ray import tune

from .. import storage
from ..logs import log_event
from ..redact import redact_text
from ..rundir import split_run_name
from ..tracking.mlflow_runs import END_REASON_TAG
from .trial import error_cause

log = logging.getLogger(__name__)

# How a trial ended, and the MLflow status its runs end with.
OUTCOME_STATUS = {"completed": "FINISHED", "pruned": "KILLED", "error": "FAILED", "unfinished": "KILLED"}

# The MLflow parent tracker of each sweep running in this process, by sweep name. Kept here, not in the
# callback, because Tune pickles its callbacks into the sweep's folder and the tracker holds the tracking
# URI's credentials.
_TRACKERS: dict[str, object] = {}
_LOCK = threading.Lock()
# The trial outcomes this process recorded, by outcomes file: Tune keeps a copy of its experiment folder (the
# sweep's) in a staging folder and copies it back over the sweep's folder, so on a resume it can put back the
# trial_outcomes.json it found when the resume started (see TrialOutcomes.read).
_RECORDED: dict[str, dict[str, dict]] = {}


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
    own status and error, and those still RUNNING (stopped because another seed failed for good, or cut off
    with the trial's process) are set KILLED with the trial's error: they did not fail themselves. Returns how
    many runs were changed (0 without tracking)."""
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
            if rec["outcome"] == "error":
                status, reason = "KILLED", f"stopped with its trial: {reason}"
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


# The keys of an outcome kept in its history when a resumed trial ends differently.
_HISTORY_KEYS = ("outcome", "tasks_done", "error", "cause")


class TrialOutcomes(tune.Callback):
    """Records how each trial ended in the sweep's ``trial_outcomes.json``: ``completed`` (reached the
    horizon), ``pruned`` (stopped by the scheduler before it), ``error`` (with the error's last line and its
    ``cause``, ``transient`` or ``permanent``); how many times it was started (``attempts``: the first start,
    Tune's retries, a ``--resume``), the errors Tune retried it after (``retried_after``), and when a resumed
    trial ends differently, its earlier outcomes (``earlier``: nothing recorded is rewritten away). Ends the
    trial's MLflow runs with FINISHED / KILLED / FAILED. Runs on the sweep's driver."""

    def __init__(self, sweep: str, path: str, horizon: int):
        self.sweep, self.path, self.horizon = sweep, path, horizon
        self._retried: dict[str, list[str]] = {}  # retries seen by this driver, by trial

    def read(self) -> dict[str, dict]:
        """{trial_id: {"outcome", "tasks_done", "error"?, "cause"?, "attempts", "retried_after"?,
        "earlier"?}} recorded so far (this and earlier attempts). Where the file lacks what this process
        recorded (Tune copied an older copy back over it), it is written again."""
        states = storage.read_json(self.path) if storage.exists(self.path) else {}
        mine = _RECORDED.get(self.path, {})
        if any(states.get(tid) != rec for tid, rec in mine.items()):
            states = {**states, **mine}
            storage.write_json(self.path, states)
        return states

    def _record(self, trial, outcome: str, error: Optional[str] = None) -> None:
        rec = {"outcome": outcome, "tasks_done": _tasks_done(trial),
               **({"error": error, "cause": error_cause(error)} if outcome == "error" else {})}
        retried = self._retried.pop(trial.trial_id, [])
        with _LOCK:
            states = self.read()
            prev = states.get(trial.trial_id)
            full = _with_history(rec, prev, retried)
            states[trial.trial_id] = full
            storage.write_json(self.path, states)
            _RECORDED.setdefault(self.path, {})[trial.trial_id] = full
        log_event(log, "trial_end", trial=trial.trial_id, **rec, attempts=full["attempts"])
        try:
            end_trial_runs(self.sweep, {trial.trial_id: rec})
        except Exception as e:  # MLflow trouble never stops a sweep; the sweep's end tries again
            log_event(log, "trial_runs_not_closed", level=logging.WARNING, trial=trial.trial_id, error=str(e)[:300])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, ended_as(trial, self.horizon))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "error", _last_line(_trial_error(trial)))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._retried.setdefault(trial.trial_id, []).append(_last_line(_trial_error(trial)))


def _with_history(rec: dict, prev: Optional[dict], retried: list[str]) -> dict:
    """``rec`` with ``attempts`` (the earlier record's, plus the starts this driver saw), the errors retried after
    (``retried_after``, accumulated) and ``earlier`` (the earlier outcomes, with the previous one appended when
    it differs from ``rec``)."""
    prev = prev or {}
    out = {**rec, "attempts": int(prev.get("attempts", 1 if prev else 0)) + 1 + len(retried)}
    after = [*prev.get("retried_after", []), *retried]
    if after:
        out["retried_after"] = after
    earlier = list(prev.get("earlier", []))
    if prev and any(prev.get(k) != rec.get(k) for k in _HISTORY_KEYS):
        earlier.append({k: prev[k] for k in _HISTORY_KEYS if k in prev})
    if earlier:
        out["earlier"] = earlier
    return out


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
        error = _last_line(_trial_error(trial))
        print(f"trial {trial.trial_id} failed ({error_cause(error)}) after {_tasks_done(trial)}/{self.horizon} "
              f"tasks: {error}", file=sys.stderr, flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        error = _last_line(_trial_error(trial))
        cause = error_cause(error)
        again = " (a permanent error: the retry fails at once with it)" if cause == "permanent" else ""
        print(f"trial {trial.trial_id} failed ({cause}), retried (--trial-retries){again}: {error}",
              file=sys.stderr, flush=True)


def _trial_error(trial):
    """The text of the trial's errors as Tune recorded them: its local error file (written as the error is
    handled; the copy in the sweep's storage, which ``trial.get_error`` reads, follows later), else that."""
    path = getattr(trial, "error_file", None)
    try:
        if path and os.path.exists(path):
            with open(path) as f:
                return f.read()
    except OSError:
        pass
    return trial.get_error()


def _last_line(err) -> str:
    """The error's last non-empty line (what the table, stderr and ``trial_outcomes.json`` show), redacted."""
    lines = [ln.strip() for ln in redact_text(str(err or "unknown error")).splitlines() if ln.strip()]
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
