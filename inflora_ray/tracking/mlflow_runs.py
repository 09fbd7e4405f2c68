"""MLflow tracking from the driver: every MLflow run (a run, a multi-seed parent, a sweep's parent and its
trials) is created here. Per-task metrics are logged at step = task index, with artifacts. A tracking server
that goes away mid-run never stops training: the loss is recorded and reported at the end; the run
directory keeps every result."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from .. import storage
from ..config import Config
from ..logs import log_event
from ..provenance import git_commit
from ..results import RESULT
from ..rundir import RunDir
from ..training.checkpoint import META_FILE, STATE_FILE
from ..training.state import task_metrics
from .plots import plot_accuracy_curve, plot_accuracy_matrix
from ..redact import has_secrets, is_redacted, redact_text, redact_uri
from .store import (TrackingUnavailable, check_server, explain_store_error, redact_config,  # noqa: F401
                    resolve_uri, store_call)

__all__ = ["EXPERIMENT_KIND", "STATUSES", "Tracker", "TrackingUnavailable", "check_server", "explain_store_error", "git_commit",
           "is_redacted", "redact_config", "redact_text", "redact_uri", "resolve_uri", "start_parent"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bounded retries: a dead server costs seconds per call, not minutes (unless the user chose otherwise).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
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


class Tracker:
    """One MLflow run (``run_id``) written through ``MlflowClient`` (thread-safe, no global active run).

    ``uri`` is the tracking URI with its credentials redacted: what messages, params, tags and
    ``tracking.json`` show. The URI in use (which may hold a password) never leaves this object."""

    def __init__(self, cfg: Config):
        from mlflow import MlflowClient

        self.cfg = cfg
        self._uri = resolve_uri(cfg)  # may hold credentials: used for the client only
        self.uri = redact_uri(self._uri)
        self.experiment_name = cfg.tracking.experiment or cfg.experiment.name
        self.run_id: Optional[str] = None
        self.lost: Optional[str] = None  # first error after which tracking stopped
        self.logged_tasks: set[int] = set()
        self.reopened_from: Optional[str] = None  # the status of the run :meth:`reopen` reopened
        self._steps_in_store: set[int] = set()  # on resume: tasks whose metrics the MLflow run already holds
        if is_redacted(self._uri):
            raise TrackingUnavailable(
                f"the tracking URI {self.uri} has its credentials redacted (inflora-ray never stores them); give "
                "it again with --tracking-uri or MLFLOW_TRACKING_URI, or keep the password out of the URI with "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        if has_secrets(self._uri):  # MLflow prints 'View run <URI>/#/...' when a run ends
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.client = self._store_call("opening the tracking store", lambda: MlflowClient(tracking_uri=self._uri))

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
        """Tags every run of this config carries (method, benchmark, seed, sweep id, the user's tags)."""
        c = self.cfg
        tags = {"method": c.method.name, "benchmark": c.data.benchmark, "seed": str(c.experiment.seed),
                "num_tasks": str(c.data.num_tasks), "model": c.model.name}
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
            self.run_id = self.client.create_run(self.experiment_id(), tags=tags, run_name=run_name).info.run_id
            self.log_params(params)
            return self.run_id

        return self._store_call(f"creating MLflow run {run_name!r}", do)

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
            return {m.step for m in self.client.get_metric_history(run_id, _STEP_PROBE)}

        self._steps_in_store = self._store_call(f"reopening MLflow run {run_id} (logged to this tracking URI?)", do)
        self.run_id = run_id
        return run_id

    # ---------------------------------------------------------------- the run directory's record of it
    def save_state(self, run: RunDir) -> None:
        """Write ``results/tracking.json``: which MLflow run this is (URI redacted) and which tasks it holds."""
        storage.write_json(run.tracking, {"uri": self.uri, "run_id": self.run_id, "experiment": self.experiment_name,
                                          "logged_tasks": sorted(self.logged_tasks)})

    @staticmethod
    def load_state(run: RunDir) -> dict:
        """The content of ``results/tracking.json`` ({} if the run has none)."""
        return storage.read_json(run.tracking) if storage.exists(run.tracking) else {}

    # ---------------------------------------------------------------- during the run
    def guard(self, what: str, fn: Callable[[], None]) -> None:
        """Run ``fn``; on any error stop tracking for good and record why (training never stops for MLflow)."""
        if self.lost is not None or self.run_id is None:
            return
        try:
            fn()
        except Exception as e:  # a dead server must never stop training
            self.lost = self.redact(f"{what}: {type(e).__name__}: {e}")[:400]
            log_event(log, "tracking_lost", level=logging.WARNING, error=self.lost, run_id=self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()],
                              synchronous=True)

    def log_task(self, rec: dict, run: RunDir) -> None:
        """Per-task metrics (step = task index) and artifacts under ``tasks/task_NNN``, then ``tracking.json``
        at once, so a resumed run never logs the task again. Metrics the MLflow run already holds (a driver
        that stopped between logging and saving) are not logged twice; the artifacts are rewritten."""
        task = int(rec[RESULT]["task"])
        if task in self.logged_tasks:
            return

        def do():
            if task not in self._steps_in_store:
                self.log_metrics(task_metrics(rec[RESULT]), step=task)
            with tempfile.TemporaryDirectory() as d:
                _write_task_artifacts(rec, run, d)
                self.client.log_artifacts(self.run_id, d, f"tasks/task_{task:03d}")
            self.logged_tasks.add(task)
            self.save_state(run)

        self.guard(f"logging task {task}", do)

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
        would race)."""
        if run_status not in MLFLOW_STATUS:
            raise ValueError(f"run_status must be one of {', '.join(MLFLOW_STATUS)}, got {run_status!r}")
        status = MLFLOW_STATUS[run_status]

        def do():
            if close:
                self.client.set_tag(self.run_id, RUN_STATUS_TAG, run_status)
            if reason and close:
                self.client.set_tag(self.run_id, END_REASON_TAG, self.redact(reason)[:500])
            elif close and END_REASON_TAG in self.client.get_run(self.run_id).data.tags:
                self.client.delete_tag(self.run_id, END_REASON_TAG)  # why an earlier attempt ended: no longer so
            if summ:
                final = {mlflow_key: summ.get(key, math.nan) for key, mlflow_key in FINAL_MLFLOW_METRICS.items()}
                self.log_metrics({k: v for k, v in final.items() if v == v})  # NaN != NaN
            self._log_files((run.metrics, run.accuracy_matrix, run.record, run.config), "results")
            last = None
            if self.cfg.tracking.log_checkpoint and run_status != "interrupted":
                last = checkpoint if checkpoint is not None else run.latest_task_checkpoint()
            if last is not None:
                self._log_files([storage.join(last, name) for name in (STATE_FILE, META_FILE)], "checkpoint")
            if close:
                self.client.set_terminated(self.run_id, status=status)

        self.guard("finishing the run", do)
        if self.lost is None and self.run_id is not None:
            self.save_state(run)

    def finish_parent(self, metrics: dict[str, float], ok: bool = True, files: tuple[str, ...] = (),
                      status: Optional[str] = None) -> None:
        """Close a parent run (seeds, sweep): its metrics, files from storage as artifacts, its status
        (``status`` if given: FINISHED, FAILED or KILLED; else FINISHED if ``ok``, FAILED if not)."""
        status = _terminal_status(status, failed=not ok)

        def do():
            if files:
                self._log_files(files)
            self.log_metrics(metrics)
            self.client.set_terminated(self.run_id, status=status)

        self.guard("finishing the parent run", do)

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
