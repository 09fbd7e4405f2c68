"""MLflow tracking from the driver: one run per experiment run, per-task metrics (step = task index) and
artifacts, parent runs over seeds. A tracking server that goes away mid-run never stops training: the loss
is recorded and reported at the end; the run directory keeps every result."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from .. import storage
from ..config import Config
from ..logs import log_event

log = logging.getLogger(__name__)

# Bounded retries: a dead server costs seconds per call, not minutes (unless the user chose otherwise).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


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


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


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


def _plot_matrix(acc: list[list[float]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(acc)
    grid = np.full((n, n), np.nan)
    for i, row in enumerate(acc):
        grid[i, :len(row)] = 100 * np.asarray(row)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.5 * n))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(i + 1):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < 60 else "black")
    ax.set_xlabel("test set of task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curve(pooled: list[float], acc: list[list[float]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = list(range(1, len(pooled) + 1))
    for j in range(len(acc)):
        ax.plot(xs[j:], [100 * acc[i][j] for i in range(j, len(acc))], lw=0.8, alpha=0.5)
    ax.plot(xs, [100 * p for p in pooled], "k-o", lw=2, label="all seen classes")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def task_metrics(rec: dict) -> dict[str, float]:
    """The per-task metric values (finite only) logged at step = task index."""
    r, s = rec["report"], rec["summary"]
    m = {"pooled_accuracy": r["pooled_accuracy"], "average_incremental_accuracy": r["average_incremental_accuracy"],
         "forgetting": s["forgetting"], "backward_transfer": s["backward_transfer"], "train_loss": r["train_loss"],
         "task_seconds": r["task_seconds"], "images_per_second": r["images_per_second"],
         "peak_memory_mb": r["peak_memory_mb"]}
    m.update({f"accuracy_task_{j}": a for j, a in enumerate(r["accuracy"])})
    m.update({f"own_head_accuracy_task_{j}": a for j, a in enumerate(r["own_head_accuracy"])})
    for layer, dim in enumerate(r.get("info", {}).get("memory_dims", [])):
        m[f"memory_dim_layer_{layer:02d}"] = dim
    return {k: float(v) for k, v in m.items() if v is not None and not math.isnan(float(v))}


class Tracker:
    """Writes one experiment run to MLflow through ``MlflowClient`` (thread-safe, no global active run)."""

    def __init__(self, cfg: Config):
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = resolve_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_name = cfg.tracking.experiment or cfg.experiment.name
        self.run_id: Optional[str] = None
        self.lost: Optional[str] = None  # first error after which tracking stopped
        self.logged_tasks: set[int] = set()

    # ---------------------------------------------------------------- start
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name)
        except Exception:  # created concurrently by another seed's tracker
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    def base_tags(self) -> dict:
        c = self.cfg
        tags = {"method": c.method.name, "benchmark": c.data.benchmark, "seed": str(c.experiment.seed),
                "num_tasks": str(c.data.num_tasks), "model": c.model.name}
        if c.tracking.sweep_id:
            tags["sweep_id"] = c.tracking.sweep_id
        tags.update({str(k): str(v) for k, v in c.tracking.tags.items()})
        return tags

    def start(self, run_name: str, record: dict, parent_run_id: Optional[str] = None,
              resume_run_id: Optional[str] = None) -> str:
        """Create (or reopen, on resume) the MLflow run and log params and tags. Errors propagate: at start,
        an unusable tracking store stops the run before compute."""
        from mlflow.entities import Param

        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
        tags = {**self.base_tags(), "run_name": run_name, "mlflow.runName": run_name}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(), tags=tags, run_name=run_name)
        self.run_id = run.info.run_id
        params = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                  for k, v in flatten(self.cfg.to_dict()).items() if not k.startswith("debug.")}
        params.update({"method": self.cfg.method.name, "benchmark": self.cfg.data.benchmark,
                       "num_workers": str(self.cfg.run.num_workers),
                       "class_order": json.dumps(record.get("class_order")),
                       "git_commit": str(git_commit())})
        params.update({f"version.{k}": str(v) for k, v in record.get("versions", {}).items()})
        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)
        return self.run_id

    # ---------------------------------------------------------------- during the run
    def _guard(self, what: str, fn) -> None:
        if self.lost is not None or self.run_id is None:
            return
        try:
            fn()
        except Exception as e:  # a dead server must never stop training
            self.lost = f"{what}: {type(e).__name__}: {str(e)[:300]}"
            log_event(log, "tracking_lost", level=logging.WARNING, error=self.lost, run_id=self.run_id)

    def log_task(self, rec: dict, run_dir: str) -> None:
        """Per-task metrics (step = task index) and artifacts under ``tasks/task_NNN``."""
        task = int(rec["report"]["task"])
        if task in self.logged_tasks:
            return

        def do():
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            metrics = [Metric(k, v, ts, task) for k, v in task_metrics(rec).items()]
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
            with tempfile.TemporaryDirectory() as d:
                acc = rec["summary"]["accuracy_matrix"]
                with open(os.path.join(d, "accuracy_matrix.csv"), "w") as f:
                    f.write("after_task," + ",".join(f"task_{j}" for j in range(len(acc))) + "\n")
                    for i, row in enumerate(acc):
                        f.write(f"{i}," + ",".join(f"{a:.6f}" for a in row) + "," * (len(acc) - len(row)) + "\n")
                _plot_matrix(acc, os.path.join(d, "accuracy_matrix.png"))
                _plot_curve(rec["summary"]["pooled_accuracy"], acc, os.path.join(d, "accuracy_vs_task.png"))
                info = rec["report"].get("info", {})
                with open(os.path.join(d, "memory_dims.json"), "w") as f:
                    json.dump({"memory_dims": info.get("memory_dims"), "memory_modes": info.get("memory_modes"),
                               "threshold": info.get("threshold"), "used_rank": info.get("used_rank")}, f, indent=1)
                adapters = storage.join(run_dir, "results", f"adapters_task_{task:03d}.pt")
                if storage.exists(adapters):
                    with open(os.path.join(d, "adapters.pt"), "wb") as f:
                        f.write(storage.read_bytes(adapters))
                self.client.log_artifacts(self.run_id, d, f"tasks/task_{task:03d}")
            self.logged_tasks.add(task)

        self._guard(f"logging task {task}", do)

    # ---------------------------------------------------------------- end
    def finish(self, run_dir: str, summ: dict, failed: bool) -> None:
        """Final artifacts (results, record, config, last checkpoint) and the run's status."""
        def do():
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            if summ:
                final = {"final_accuracy": summ["final_accuracy"],
                         "final_average_incremental_accuracy": summ["average_incremental_accuracy"],
                         "final_forgetting": summ["forgetting"], "final_backward_transfer": summ["backward_transfer"]}
                self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in final.items()
                                                            if not math.isnan(float(v))], synchronous=True)
            with tempfile.TemporaryDirectory() as d:
                res = storage.join(run_dir, "results")
                for name in ("metrics.json", "accuracy_matrix.parquet", "record.json", "config.yaml"):
                    src = storage.join(res, name)
                    if storage.exists(src):
                        Path(d, name).write_bytes(storage.read_bytes(src))
                self.client.log_artifacts(self.run_id, d, "results")
            if self.cfg.tracking.log_checkpoint:
                last = latest_task_checkpoint(run_dir)
                if last is not None:
                    with tempfile.TemporaryDirectory() as d:
                        for name in ("state.pt", "meta.json"):
                            src = storage.join(last, name)
                            if storage.exists(src):
                                Path(d, name).write_bytes(storage.read_bytes(src))
                        self.client.log_artifacts(self.run_id, d, "checkpoint")
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

        self._guard("finishing the run", do)
        if self.lost is None and self.run_id is not None:
            storage.write_json(storage.join(run_dir, "results", "tracking.json"),
                               {"uri": self.uri, "run_id": self.run_id, "experiment": self.experiment_name,
                                "logged_tasks": sorted(self.logged_tasks)})


def latest_task_checkpoint(run_dir: str) -> Optional[str]:
    """The last task-boundary checkpoint directory of a run, if any."""
    names = [n for n in storage.list_names(run_dir) if n.startswith("checkpoint_task") and "_epoch" not in n]
    return storage.join(run_dir, sorted(names)[-1]) if names else None


def start_parent(cfg: Config, parent_name: str, seeds: list[int]) -> tuple[Tracker, str]:
    """Create the parent run of a multi-seed experiment (children link to it with mlflow.parentRunId)."""
    from mlflow.entities import Param

    tracker = Tracker(cfg)
    tags = {**tracker.base_tags(), "seed": "parent", "mlflow.runName": parent_name,
            "seeds": ",".join(map(str, seeds))}
    run = tracker.client.create_run(tracker.experiment_id(), tags=tags, run_name=parent_name)
    tracker.run_id = run.info.run_id
    tracker.client.log_batch(run.info.run_id, params=[Param("seeds", ",".join(map(str, seeds))),
                                                      Param("method", cfg.method.name),
                                                      Param("benchmark", cfg.data.benchmark)], synchronous=True)
    return tracker, run.info.run_id


def finish_parent(tracker: Tracker, aggregate: dict[str, float], all_ok: bool) -> None:
    """Log the over-seed aggregate (mean/std of final metrics) on the parent run and close it."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)

    def do():
        tracker.client.log_batch(tracker.run_id, metrics=[Metric(k, v, ts, 0) for k, v in aggregate.items()],
                                 synchronous=True)
        tracker.client.set_terminated(tracker.run_id, status="FINISHED" if all_ok else "FAILED")

    tracker._guard("finishing the parent run", do)
