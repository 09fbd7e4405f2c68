"""MLflow tracking from the driver: every MLflow run (a run, a multi-seed parent, a sweep's parent and its
trials) is created here. Per-task metrics are logged at step = task index, with artifacts.

Every MLflow call is retried with backoff when its error passes (:func:`.store.retry_call`: a connection
refused, reset or timed out, an answer 429 or 5xx), for about a minute. A tracking server that stays away
longer never stops training: what could not be written is kept as the tracker's backlog (tracking.json says
which tasks) and written at the next opportunity (the next task, the end of the run, a ``--resume``), in
order and never twice. Only what the server still refuses when the run ends is reported missing, with the
command that logs it; the run directory keeps every result."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from .. import storage
from ..config import Config
from ..logs import log_event
from ..provenance import git_commit
from ..results import RESULT, read_task_result
from ..rundir import RunDir
from ..training.checkpoint import META_FILE, STATE_FILE
from ..training.state import task_metrics
from .plots import plot_accuracy_curve, plot_accuracy_matrix
from ..redact import has_secrets, is_redacted, redact_text, redact_uri
from .store import (TrackingUnavailable, check_server, explain_store_error, redact_config,  # noqa: F401
                    resolve_uri, retry_call, retry_policy, store_call)

__all__ = ["EXPERIMENT_KIND", "STATUSES", "Tracker", "TrackingUnavailable", "check_server", "explain_store_error", "git_commit",
           "is_redacted", "redact_config", "redact_text", "redact_uri", "resolve_uri", "start_parent"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# The tracker retries each call itself (.store.retry_call: backoff with jitter, bounded in time, then the
# backlog), so MLflow's own quick retries are off unless the user chose otherwise.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 100  # params per log_batch call
STATUSES = ("FINISHED", "FAILED", "KILLED")  # how a run (or a parent run) can end
_STEP_PROBE = "pooled_accuracy"  # a metric every task logs: its steps are the tasks already in the store
_KIND_TAG = "mlflow.experimentKind"  # MLflow 3: which view the UI opens an experiment in
EXPERIMENT_KIND = "custom_model_development"  # the training view (not the GenAI one)
END_REASON_TAG = "end_reason"  # why a run ended FAILED or KILLED
RUN_STATUS_TAG = "run_status"  # how a run ended, in the word its metrics.json and the report use
# A run's status (inflora_ray.results.RUN_STATUSES) -> its MLflow status: KILLED for what --resume continues.
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "interrupted": "KILLED", "failed": "FAILED"}
# A run's final metrics: key in its summary (metrics.json) -> the MLflow metric that holds it (logged once, at
# step 0, when the run ends). Without a suffix: pooled accuracy (over the test images of all seen tasks
# together); _task_mean: the mean of the per-task accuracies (inflora_ray.core.metrics says which papers use which).
FINAL_MLFLOW_METRICS = {"final_accuracy": "final_accuracy",
                        "final_accuracy_task_mean": "final_accuracy_task_mean",
                        "average_incremental_accuracy": "final_average_incremental_accuracy",
                        "average_incremental_accuracy_task_mean": "final_average_incremental_accuracy_task_mean",
                        "forgetting": "final_forgetting", "backward_transfer": "final_backward_transfer"}


def param_text(value: object) -> str:
    """A config value as an MLflow param holds it: lists and dicts as JSON, anything else as ``str``."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _terminal_status(status: Optional[str], failed: bool) -> str:
    """The MLflow status a run ends with: ``status`` if given (checked), else FAILED / FINISHED."""
    if status is None:
        return "FAILED" if failed else "FINISHED"
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    if failed and status == "FINISHED":
        raise ValueError("a failed run cannot end as FINISHED: give status='FAILED' or 'KILLED'")
    return status


class RetryingClient:
    """An ``MlflowClient`` whose every call is retried (:func:`.store.retry_call`) under the policy that
    ``policy()`` gives at the time of the call; ``create_run``, which would make a second run when an
    attempt's answer is lost, is not (:meth:`Tracker.create` retries it safely). ``raw``: the client itself."""

    def __init__(self, client, uri: str, policy: Callable[[], storage.RetryPolicy]):
        self.raw, self._uri, self._policy = client, uri, policy

    def __getattr__(self, name: str):
        attr = getattr(self.raw, name)
        if name.startswith("_") or name == "create_run" or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return retry_call(self._uri, f"MlflowClient.{name}", lambda: attr(*args, **kwargs), self._policy())
        return call


class Tracker:
    """One MLflow run (``run_id``) written through ``MlflowClient`` (thread-safe, no global active run).

    ``uri`` is the tracking URI with its credentials redacted: what messages, params, tags and
    ``tracking.json`` show. The URI in use (which may hold a password) never leaves this object.

    Writes during a run go through :meth:`guard`: each call is retried; what still fails is owed (the
    backlog, :attr:`backlog` for tasks) and made again, in order, before the next write and at the end."""

    def __init__(self, cfg: Config):
        from mlflow import MlflowClient

        self.cfg = cfg
        self._uri = resolve_uri(cfg)  # may hold credentials: used for the client only
        self.uri = redact_uri(self._uri)
        self.experiment_name = cfg.tracking.experiment or cfg.experiment.name
        self.run_id: Optional[str] = None
        self.lost: Optional[str] = None  # why MLflow lacks what is owed (None: it holds everything written)
        self.logged_tasks: set[int] = set()
        self.reopened_from: Optional[str] = None  # the status of the run :meth:`reopen` reopened
        self._steps_in_store: set[int] = set()  # tasks whose metrics the MLflow run already holds
        # What MLflow still lacks, in the order it was written: a task index (or the name of a write) -> (what,
        # the calls that write it). Made again before each new write and at the end.
        self._owed: dict[object, tuple[str, Callable[[], None]]] = {}
        self._down = False  # the last write failed: the next one is tried once, without waiting
        self._recheck = False  # a write failed: read which tasks reached the store before logging any again
        self._last_chance = False  # the run is ending: full retries, whatever failed before
        self._lock = threading.RLock()  # the progress watcher's thread logs tasks, the driver ends the run
        try:
            retry_policy()
        except ValueError as e:
            raise TrackingUnavailable(str(e)) from None
        if is_redacted(self._uri):
            raise TrackingUnavailable(
                f"the tracking URI {self.uri} has its credentials redacted (inflora-ray never stores them); give "
                "it again with --tracking-uri or MLFLOW_TRACKING_URI, or keep the password out of the URI with "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        if has_secrets(self._uri):  # MLflow prints 'View run <URI>/#/...' when a run ends
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        client = self._store_call("opening the tracking store", lambda: MlflowClient(tracking_uri=self._uri))
        self.client = RetryingClient(client, self._uri, self._policy)

    def _policy(self) -> storage.RetryPolicy:
        """The retry policy of the next call: one attempt while the server is down (the backlog waits for the
        next opportunity), else :func:`.store.retry_policy` (about a minute)."""
        if self._down and not self._last_chance:
            return storage.RetryPolicy(attempts=1, max_seconds=0.0)
        return retry_policy()

    def _store_call(self, doing: str, fn: Callable[[], T]) -> T:
        """``fn()``; any error becomes :class:`TrackingUnavailable` saying what to fix, without credentials."""
        return store_call(self._uri, doing, fn)

    def probe(self) -> None:
        """Check cheaply that the store answers (the server's health check, then a look-up of the experiment,
        which also opens a database store); :class:`TrackingUnavailable` says what to fix."""
        check_server(self._uri)
        self._store_call(f"looking up experiment {self.experiment_name!r}",
                         lambda: self.client.get_experiment_by_name(self.experiment_name))

    def redact(self, text: str) -> str:
        """``text`` without the credentials of the tracking URI (or of any URL in it)."""
        return redact_text(text, self._uri)

    def runs_page(self) -> Optional[str]:
        """The MLflow UI's table of the experiment's runs, ``<server>/#/experiments/<id>/runs`` (credentials
        redacted), for a tracking server (http/https); None for a local store, which has no UI address, or
        when the experiment does not exist. MLflow 3's UI opened at an experiment's root shows its GenAI
        overview, not the runs."""
        if not self.uri.startswith(("http://", "https://")):
            return None
        exp = self._store_call(f"looking up experiment {self.experiment_name!r}",
                               lambda: self.client.get_experiment_by_name(self.experiment_name))
        return None if exp is None else f"{self.uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs"

    # ---------------------------------------------------------------- creating runs
    def experiment_id(self) -> str:
        """The experiment's id, creating it if needed; it is marked as a model-training experiment
        (:data:`EXPERIMENT_KIND`) unless it already says what it is, so the MLflow UI opens its training view."""
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            try:
                exp_id = self.client.create_experiment(self.experiment_name)
            except Exception:  # created concurrently by another seed's tracker
                exp_id = self.client.get_experiment_by_name(self.experiment_name).experiment_id
            kind = None
        else:
            exp_id, kind = exp.experiment_id, exp.tags.get(_KIND_TAG)
        if kind is None:
            self.client.set_experiment_tag(exp_id, _KIND_TAG, EXPERIMENT_KIND)
        return exp_id

    def base_tags(self) -> dict[str, str]:
        """Tags every run of this config carries (method, benchmark, seed, what its accuracies are measured on
        (``eval_split``: test or validation), sweep id, the user's tags)."""
        c = self.cfg
        tags = {"method": c.method.name, "benchmark": c.data.benchmark, "seed": str(c.experiment.seed),
                "num_tasks": str(c.data.num_tasks), "model": c.model.name, "eval_split": c.data.eval_split}
        if c.tracking.sweep_id:
            tags["sweep_id"] = c.tracking.sweep_id
        tags.update({str(k): str(v) for k, v in c.tracking.tags.items()})
        return tags

    def log_params(self, params: dict[str, object]) -> None:
        """Log params (values as strings, lists/dicts as JSON, credentials redacted, cut to MLflow's length
        limit), in batches."""
        from mlflow.entities import Param

        text = {k: param_text(v) for k, v in params.items()}
        items = [Param(k, self.redact(v)[:_PARAM_CHARS]) for k, v in sorted(text.items())]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH], synchronous=True)

    def create(self, run_name: str, tags: dict[str, str], params: dict[str, object],
               parent_run_id: Optional[str] = None) -> str:
        """Create this tracker's MLflow run (a child of ``parent_run_id`` if given) with tags and params.
        Errors raise :class:`TrackingUnavailable`: at start, an unusable store stops the run before compute."""
        tags = {k: self.redact(v) for k, v in {**self.base_tags(), **tags, "mlflow.runName": run_name}.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id

        def do() -> str:
            self.run_id = self._create_run(self.experiment_id(), tags, run_name)
            self.log_params(params)
            return self.run_id

        return self._store_call(f"creating MLflow run {run_name!r}", do)

    def _create_run(self, exp_id: str, tags: dict[str, str], run_name: str) -> str:
        """``create_run``, retried without ever making two runs: an attempt after a failed one first looks for
        the run that the failed one may have created before its answer was lost (same name, same start time)."""
        start, tried = _now_ms(), []

        def attempt() -> str:
            if tried and "'" not in run_name:
                found = self.client.raw.search_runs(
                    [exp_id], f"attributes.run_name = '{run_name}' and attributes.start_time = {start}", max_results=1)
                if found:
                    return found[0].info.run_id
            tried.append(True)
            return self.client.raw.create_run(exp_id, start_time=start, tags=tags, run_name=run_name).info.run_id

        return retry_call(self._uri, "MlflowClient.create_run", attempt, self._policy())

    def start(self, run_name: str, record: dict, parent_run_id: Optional[str] = None,
              resume_run_id: Optional[str] = None) -> str:
        """Create (or reopen, on resume) the MLflow run of an experiment run, with its whole config as params.
        On resume, the tasks whose metrics the run already holds are never logged again."""
        if resume_run_id:
            return self.reopen(resume_run_id)
        params: dict[str, object] = dict(self.cfg.flat())
        params.update({"method": self.cfg.method.name, "benchmark": self.cfg.data.benchmark,
                       "num_workers": self.cfg.run.num_workers, "class_order": json.dumps(record.get("class_order")),
                       "git_commit": record.get("code", {}).get("git_commit", git_commit())})
        params.update({f"version.{k}": v for k, v in record.get("versions", {}).items()})
        # Code identity and hardware also as tags: searchable, and shown in the runs table.
        tags = {"run_name": run_name, **{f"code.{k}": str(v) for k, v in record.get("code", {}).items()
                                         if v is not None}}
        tags.update({f"accelerator.{k}": str(v) for k, v in (record.get("accelerator") or {}).items()
                     if v is not None})
        return self.create(run_name, tags, params, parent_run_id)

    def reopen(self, run_id: str) -> str:
        """Make ``run_id`` this tracker's run again: set it RUNNING (its status before is kept in
        ``reopened_from``) and read which tasks it already holds metrics of (a resumed run or sweep parent).
        Errors raise :class:`TrackingUnavailable`."""
        def do() -> set[int]:
            self.reopened_from = self.client.get_run(run_id).info.status
            self.client.update_run(run_id, status="RUNNING")
            return self._stored_steps(run_id)

        self._steps_in_store = self._store_call(f"reopening MLflow run {run_id} (logged to this tracking URI?)", do)
        self.run_id = run_id
        return run_id

    def _stored_steps(self, run_id: str) -> set[int]:
        """The tasks whose metrics the MLflow run ``run_id`` holds (the steps of :data:`_STEP_PROBE`)."""
        return {m.step for m in self.client.get_metric_history(run_id, _STEP_PROBE)}

    # ---------------------------------------------------------------- the run directory's record of it
    def save_state(self, run: RunDir) -> None:
        """Write ``results/tracking.json``: which MLflow run this is (URI redacted), which tasks it holds, and
        what it still lacks: ``backlog`` (the tasks not yet logged) and ``owed`` (every write not yet made)."""
        with self._lock:
            state = {"uri": self.uri, "run_id": self.run_id, "experiment": self.experiment_name,
                     "logged_tasks": sorted(self.logged_tasks), "backlog": self.backlog,
                     "owed": [what for what, _ in self._owed.values()]}
        storage.write_json(run.tracking, state)

    def _save(self, run: RunDir | None) -> None:
        """:meth:`save_state`, unless there is no run folder; a store that fails is logged, never raised (the
        next save writes it all)."""
        if run is None or self.run_id is None:
            return
        try:
            self.save_state(run)
        except OSError as e:
            log_event(log, "tracking_state_not_saved", level=logging.WARNING, path=run.tracking,
                      error=self.redact(f"{type(e).__name__}: {e}")[:300])

    @staticmethod
    def load_state(run: RunDir) -> dict:
        """The content of ``results/tracking.json`` ({} if the run has none)."""
        return storage.read_json(run.tracking) if storage.exists(run.tracking) else {}

    # ---------------------------------------------------------------- during the run
    @property
    def backlog(self) -> list[int]:
        """The tasks whose metrics and artifacts MLflow does not hold yet (owed), in order."""
        with self._lock:
            return sorted(k for k in self._owed if isinstance(k, int))

    def owed(self) -> list[str]:
        """What MLflow still lacks, in words ("logging task 3", "finishing the run (...)"), in order."""
        with self._lock:
            return [what for what, _ in self._owed.values()]

    def guard(self, what: str, fn: Callable[[], None], key: object = None) -> bool:
        """Owe ``fn`` (MLflow calls writing ``what``; with a ``key``, it replaces a write of the same key still
        owed), then make every owed write in order (:meth:`catch_up`). Each call is retried; what still fails
        stays owed for the next opportunity (training never stops for MLflow). True when nothing is owed."""
        if self.run_id is None:
            return False
        with self._lock:
            self._owed[object() if key is None else key] = (what, fn)
            return self.catch_up()

    def catch_up(self) -> bool:
        """Make the owed writes in order, stopping at the first that fails (its error becomes :attr:`lost`, and
        until a call succeeds again each next write is tried once, without waiting). True when none is left."""
        with self._lock:
            if self.run_id is None:
                return False
            doing = next(iter(self._owed.values()), ("",))[0]
            try:
                if self._recheck and self.backlog:  # a failed write may have reached the store: never log twice
                    self._steps_in_store |= self._stored_steps(self.run_id)
                    self._recheck = self._down = False
                for key, (what, fn) in list(self._owed.items()):
                    doing = what
                    fn()
                    self._owed.pop(key, None)
                    self._down = False
            except Exception as e:  # a dead server must never stop training
                return self._fell_behind(doing, e)
            if self.lost is not None:
                log_event(log, "tracking_caught_up", run_id=self.run_id, after=self.lost)
                self.lost = None
            return True

    def _fell_behind(self, what: str, e: Exception) -> bool:
        """Record that writing ``what`` failed (its retries spent, or refused): logged, kept as :attr:`lost`."""
        self.lost = self.redact(f"{what}: {type(e).__name__}: {e}")[:400]
        self._down = self._recheck = True
        log_event(log, "tracking_lost", level=logging.WARNING, error=self.lost, run_id=self.run_id,
                  owed=", ".join(self.owed())[:500], next="made again at the next task, at the end, or on --resume")
        return False

    def log_metrics(self, metrics: dict[str, float], step: int = 0, ts: int | None = None) -> None:
        """Log ``metrics`` at ``step`` with the timestamp ``ts`` (ms; default now) in one batch."""
        from mlflow.entities import Metric

        ts = _now_ms() if ts is None else ts
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()],
                              synchronous=True)

    def log_task(self, rec: dict, run: RunDir) -> None:
        """Per-task metrics (step = task index) and artifacts under ``tasks/task_NNN``, then ``tracking.json``
        at once, so a resumed run never logs the task again. Metrics the MLflow run already holds (a driver
        that stopped between logging and saving) are not logged twice; the artifacts are rewritten."""
        task = int(rec[RESULT]["task"])
        with self._lock:
            if task in self.logged_tasks or self.run_id is None:
                return
            if not self.guard(f"logging task {task}", self._task_write(run, task, lambda: rec), key=task):
                self._save(run)  # the backlog, for a driver that stops before it is delivered

    def _task_write(self, run: RunDir, task: int, record: Callable[[], dict]) -> Callable[[], None]:
        """The writes of task ``task`` (its record from ``record()``): metrics unless the store holds them,
        artifacts, then ``tracking.json``. Timestamped now, when the task is done, however late they are made."""
        ts = _now_ms()

        def do():
            rec = record()
            if task not in self._steps_in_store:
                self.log_metrics(task_metrics(rec[RESULT]), step=task, ts=ts)
                self._steps_in_store.add(task)
            with tempfile.TemporaryDirectory() as d:
                _write_task_artifacts(rec, run, d)
                self.client.log_artifacts(self.run_id, d, f"tasks/task_{task:03d}")
            self.logged_tasks.add(task)
            self._owed.pop(task, None)
            self._save(run)

        return do

    def _owe_unlogged_tasks(self, run: RunDir) -> None:
        """Owe every task whose results are in ``run`` but which is neither logged nor owed (a backlog left by
        an earlier driver of the run), read back from its result file when it is written."""
        try:
            done = run.finished_tasks()
        except OSError:  # the store does not answer: the tasks the watcher gave are owed already
            return
        for task in done:
            if task not in self.logged_tasks and task not in self._owed:
                self._owed[task] = (f"logging task {task}",
                                    self._task_write(run, task, functools.partial(read_task_result, run, task)))

    # ---------------------------------------------------------------- end
    def finish(self, run: RunDir, summ: dict, run_status: str = "finished", reason: Optional[str] = None,
               checkpoint: Optional[str] = None, close: bool = True) -> None:
        """Final metrics and artifacts (results, record, config and, unless interrupted, the final checkpoint)
        and how the run ended: ``run_status`` (:data:`~inflora_ray.results.RUN_STATUSES`) as the tag
        ``run_status``, and the MLflow status it maps to (:data:`MLFLOW_STATUS`: FINISHED, or KILLED for a run
        that ``--resume`` continues, or FAILED). ``reason``: why it failed or did not finish, kept as the run's
        ``end_reason`` tag. ``checkpoint``: the final checkpoint from Ray Train's Result; a failed run has none,
        and its last task checkpoint is logged. ``close=False``: none of status, ``run_status`` and
        ``end_reason`` is written (a sweep ends the runs of the trials Ray Tune stopped, and two writers of them
        would race).

        First every write still owed (the backlog, and any task whose results are in ``run`` but which is not
        logged) is made, with full retries; what the server still refuses is reported (:meth:`_report_owed`)."""
        if run_status not in MLFLOW_STATUS:
            raise ValueError(f"run_status must be one of {', '.join(MLFLOW_STATUS)}, got {run_status!r}")
        status = MLFLOW_STATUS[run_status]
        ts = _now_ms()

        def do():
            if close:
                self.client.set_tag(self.run_id, RUN_STATUS_TAG, run_status)
            if reason and close:
                self.client.set_tag(self.run_id, END_REASON_TAG, self.redact(reason)[:500])
            elif close and END_REASON_TAG in self.client.get_run(self.run_id).data.tags:
                self.client.delete_tag(self.run_id, END_REASON_TAG)  # why an earlier attempt ended: no longer so
            if summ:
                final = {mlflow_key: summ.get(key, math.nan) for key, mlflow_key in FINAL_MLFLOW_METRICS.items()}
                self.log_metrics({k: v for k, v in final.items() if v == v}, ts=ts)  # NaN != NaN
            self._log_files((run.metrics, run.accuracy_matrix, run.record, run.config), "results")
            last = None
            if self.cfg.tracking.log_checkpoint and run_status != "interrupted":
                last = checkpoint if checkpoint is not None else run.latest_task_checkpoint()
            if last is not None:
                self._log_files([storage.join(last, name) for name in (STATE_FILE, META_FILE)], "checkpoint")
            if close:
                self.client.set_terminated(self.run_id, status=status)

        # An interrupted driver (Ctrl-C) does not wait out a server already known down: --resume logs it all.
        self._end("finishing the run (final metrics, results, status)", do, run,
                  last_chance=run_status != "interrupted")

    def finish_parent(self, metrics: dict[str, float], ok: bool = True, files: tuple[str, ...] = (),
                      status: Optional[str] = None) -> None:
        """Close a parent run (seeds, sweep): its metrics, files from storage as artifacts, its status
        (``status`` if given: FINISHED, FAILED or KILLED; else FINISHED if ``ok``, FAILED if not)."""
        status = _terminal_status(status, failed=not ok)
        ts = _now_ms()

        def do():
            if files:
                self._log_files(files)
            self.log_metrics(metrics, ts=ts)
            self.client.set_terminated(self.run_id, status=status)

        self._end("finishing the parent run (its metrics, files, status)", do)

    def _end(self, what: str, fn: Callable[[], None], run: RunDir | None = None, last_chance: bool = True) -> None:
        """The last writes of the run (``fn``), after everything owed, with full retries however the server
        did before (``last_chance``); then ``tracking.json``, and a report of whatever is still owed."""
        if self.run_id is None:
            return
        with self._lock:
            if run is not None:
                self._owe_unlogged_tasks(run)
            self._last_chance = last_chance
            try:
                done = self.guard(what, fn, key="end")
            finally:
                self._last_chance = False
            self._save(run)
            if not done:
                self._report_owed(run)

    def _report_owed(self, run: RunDir | None) -> None:
        """Say that the run ends with writes MLflow still lacks (a ``tracking_incomplete`` event and a line on
        stderr): which, why, where the results are kept, and the command that logs them."""
        tasks = self.backlog
        missing = "; ".join([*([f"the metrics and artifacts of task(s) {', '.join(map(str, tasks))}"] if tasks else []),
                             *[w for w in self.owed() if not w.startswith("logging task ")]])
        backfill = None
        if run is not None:
            storage_path = run.path.rstrip("/").rsplit("/", 1)[0]
            backfill = f"python -m inflora_ray.run --resume {run.name} run.storage_path={storage_path}"
        log_event(log, "tracking_incomplete", level=logging.WARNING, run_id=self.run_id, uri=self.uri,
                  missing=missing, error=self.lost, backfill=backfill)
        kept = f" Every result is kept in {run.results}; once the server answers, write them with: {backfill}" \
            if run is not None else ""
        print(self.redact(f"warning: MLflow run {self.run_id} at {self.uri} is incomplete, the server kept failing "
                          f"({self.lost}); not written: {missing}.{kept}"), file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- a parent's children (sweeps)
    def child_runs(self, name_prefix: Optional[str] = None) -> list:
        """Every MLflow run whose parent is this tracker's run (all pages); with ``name_prefix``, only those
        whose run name starts with it (searched by the store, not filtered here)."""
        filt = f"tags.`mlflow.parentRunId` = '{self.run_id}'"
        if name_prefix:
            escaped = name_prefix.replace("'", "").replace("%", "")
            filt += f" and attributes.run_name LIKE '{escaped}%'"
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id()], filt, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def end_run(self, run_id: str, status: str, reason: Optional[str] = None) -> None:
        """End another run of this store (a sweep's trial whose process was stopped) with ``status``
        (FINISHED, FAILED or KILLED); ``reason`` becomes its ``end_reason`` tag."""
        status = _terminal_status(status, failed=False)
        if reason:
            self.client.set_tag(run_id, END_REASON_TAG, self.redact(reason)[:500])
        self.client.set_terminated(run_id, status=status)

    def _log_files(self, paths, artifact_path: Optional[str] = None) -> None:
        """Log the files at ``paths`` (in storage; those that do not exist are skipped) as artifacts under
        ``artifact_path``, each by its file name."""
        with tempfile.TemporaryDirectory() as d:
            for src in paths:
                if storage.exists(src):
                    Path(d, src.rstrip("/").rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(src))
            self.client.log_artifacts(self.run_id, d, artifact_path)


def _write_task_artifacts(rec: dict, run: RunDir, d: str) -> None:
    """A task's artifacts into folder ``d``: accuracy matrix (CSV, PNG), accuracy curve, memory dims, adapter."""
    acc = rec["summary"]["accuracy_matrix"]
    with open(os.path.join(d, "accuracy_matrix.csv"), "w") as f:
        f.write("after_task," + ",".join(f"task_{j}" for j in range(len(acc))) + "\n")
        for i, row in enumerate(acc):
            f.write(f"{i}," + ",".join(f"{a:.6f}" for a in row) + "," * (len(acc) - len(row)) + "\n")
    plot_accuracy_matrix(acc, os.path.join(d, "accuracy_matrix.png"))
    plot_accuracy_curve(rec["summary"]["pooled_accuracy"], acc, os.path.join(d, "accuracy_vs_task.png"))
    info = rec[RESULT].get("info", {})
    with open(os.path.join(d, "memory_dims.json"), "w") as f:
        json.dump({k: info.get(k) for k in ("memory_dims", "memory_modes", "threshold", "used_rank")}, f, indent=1)
    adapters = run.adapters(int(rec[RESULT]["task"]))
    if storage.exists(adapters):
        Path(d, "adapters.pt").write_bytes(storage.read_bytes(adapters))


def start_parent(cfg: Config, name: str, params: dict[str, object], tags: dict[str, str]) -> Tracker:
    """Create a parent MLflow run (over seeds, or a sweep's); children link to it with ``mlflow.parentRunId``."""
    tracker = Tracker(cfg)
    tracker.create(name, tags, params)
    return tracker
