"""MLflow tracking from the driver: every MLflow run (a run, a multi-seed parent, a sweep's parent and its
trials) is created here. Per-task metrics are logged at step = task index, with artifacts. A tracking server
that goes away mid-run never stops training: the loss is recorded and reported at the end; the run
directory keeps every result."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from .. import storage
from ..config import Config
from ..logs import log_event
from ..rundir import META_FILE, STATE_FILE, RunDir
from ..training.state import task_metrics
from .plots import plot_accuracy_curve, plot_accuracy_matrix

log = logging.getLogger(__name__)

# Bounded retries: a dead server costs seconds per call, not minutes (unless the user chose otherwise).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 100  # params per log_batch call


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be used at start; the message says what to fix."""


def resolve_uri(cfg: Config) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else MLflow's default (a local store in the working dir)."""
    import mlflow

    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast if an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status != 200:
                raise TrackingUnavailable(f"MLflow server at {uri} answered {resp.status} on /health")
    except (urllib.error.URLError, OSError) as e:
        raise TrackingUnavailable(
            f"MLflow tracking server at {uri} is unreachable ({getattr(e, 'reason', e)}); start it "
            f"(mlflow server --host 127.0.0.1 --port PORT), fix tracking.uri / --tracking-uri / MLFLOW_TRACKING_URI, "
            "or run with tracking.enabled=false") from None


def git_commit() -> Optional[str]:
    """The git commit of the code (working directory, else the package's checkout), if any."""
    for cwd in (os.getcwd(), str(Path(__file__).resolve().parent)):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
            if out.returncode == 0:
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """One MLflow run (``run_id``) written through ``MlflowClient`` (thread-safe, no global active run)."""

    def __init__(self, cfg: Config):
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = resolve_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_name = cfg.tracking.experiment or cfg.experiment.name
        self.run_id: Optional[str] = None
        self.lost: Optional[str] = None  # first error after which tracking stopped
        self.logged_tasks: set[int] = set()

    # ---------------------------------------------------------------- creating runs
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name)
        except Exception:  # created concurrently by another seed's tracker
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

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
        """Log params (values as strings, lists/dicts as JSON, cut to MLflow's length limit), in batches."""
        from mlflow.entities import Param

        text = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in params.items()}
        items = [Param(k, v[:_PARAM_CHARS]) for k, v in sorted(text.items())]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH], synchronous=True)

    def create(self, run_name: str, tags: dict[str, str], params: dict[str, object],
               parent_run_id: Optional[str] = None) -> str:
        """Create this tracker's MLflow run (a child of ``parent_run_id`` if given) with tags and params.
        Errors propagate: at start, an unusable tracking store stops the run before compute."""
        tags = {**self.base_tags(), **tags, "mlflow.runName": run_name}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(self.experiment_id(), tags=tags, run_name=run_name).info.run_id
        self.log_params(params)
        return self.run_id

    def start(self, run_name: str, record: dict, parent_run_id: Optional[str] = None,
              resume_run_id: Optional[str] = None) -> str:
        """Create (or reopen, on resume) the MLflow run of an experiment run, with its whole config as params."""
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
        params: dict[str, object] = dict(self.cfg.flat())
        params.update({"method": self.cfg.method.name, "benchmark": self.cfg.data.benchmark,
                       "num_workers": self.cfg.run.num_workers, "class_order": json.dumps(record.get("class_order")),
                       "git_commit": git_commit()})
        params.update({f"version.{k}": v for k, v in record.get("versions", {}).items()})
        return self.create(run_name, {"run_name": run_name}, params, parent_run_id)

    # ---------------------------------------------------------------- the run directory's record of it
    def save_state(self, run: RunDir) -> None:
        """Write ``results/tracking.json``: which MLflow run this is and which tasks it already holds."""
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
            self.lost = f"{what}: {type(e).__name__}: {str(e)[:300]}"
            log_event(log, "tracking_lost", level=logging.WARNING, error=self.lost, run_id=self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()],
                              synchronous=True)

    def log_task(self, rec: dict, run: RunDir) -> None:
        """Per-task metrics (step = task index) and artifacts under ``tasks/task_NNN``."""
        task = int(rec["report"]["task"])
        if task in self.logged_tasks:
            return

        def do():
            self.log_metrics(task_metrics(rec["report"]), step=task)
            with tempfile.TemporaryDirectory() as d:
                _write_task_artifacts(rec, run, d)
                self.client.log_artifacts(self.run_id, d, f"tasks/task_{task:03d}")
            self.logged_tasks.add(task)

        self.guard(f"logging task {task}", do)

    # ---------------------------------------------------------------- end
    def finish(self, run: RunDir, summ: dict, failed: bool) -> None:
        """Final metrics and artifacts (results, record, config, last checkpoint) and the run's status."""
        def do():
            if summ:
                final = {"final_accuracy": summ["final_accuracy"],
                         "final_average_incremental_accuracy": summ["average_incremental_accuracy"],
                         "final_forgetting": summ["forgetting"], "final_backward_transfer": summ["backward_transfer"]}
                self.log_metrics({k: v for k, v in final.items() if v == v})  # NaN != NaN
            self._log_files(run.results, ("metrics.json", "accuracy_matrix.parquet", "record.json", "config.yaml"),
                            "results")
            last = run.latest_task_checkpoint() if self.cfg.tracking.log_checkpoint else None
            if last is not None:
                self._log_files(last, (STATE_FILE, META_FILE), "checkpoint")
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

        self.guard("finishing the run", do)
        if self.lost is None and self.run_id is not None:
            self.save_state(run)

    def finish_parent(self, metrics: dict[str, float], ok: bool, files: tuple[str, ...] = ()) -> None:
        """Close a parent run (seeds, sweep): its metrics, files from storage as artifacts, its status."""
        def do():
            if files:
                with tempfile.TemporaryDirectory() as d:
                    for src in files:
                        Path(d, src.rstrip("/").rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(src))
                    self.client.log_artifacts(self.run_id, d)
            self.log_metrics(metrics)
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")

        self.guard("finishing the parent run", do)

    def _log_files(self, folder: str, names: tuple[str, ...], artifact_path: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            for name in names:
                src = storage.join(folder, name)
                if storage.exists(src):
                    Path(d, name).write_bytes(storage.read_bytes(src))
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
    info = rec["report"].get("info", {})
    with open(os.path.join(d, "memory_dims.json"), "w") as f:
        json.dump({k: info.get(k) for k in ("memory_dims", "memory_modes", "threshold", "used_rank")}, f, indent=1)
    adapters = run.adapters(int(rec["report"]["task"]))
    if storage.exists(adapters):
        Path(d, "adapters.pt").write_bytes(storage.read_bytes(adapters))


def start_parent(cfg: Config, name: str, params: dict[str, object], tags: dict[str, str]) -> Tracker:
    """Create a parent MLflow run (over seeds, or a sweep's); children link to it with ``mlflow.parentRunId``."""
    tracker = Tracker(cfg)
    tracker.create(name, tags, params)
    return tracker
