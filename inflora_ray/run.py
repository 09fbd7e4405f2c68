"""``python -m inflora_ray.run``: the whole task sequence as one Ray Train job.

Connects to the cluster in ``RAY_ADDRESS`` when set (so ``ray job submit -- python -m inflora_ray.run``
works), otherwise starts a local Ray. Everything that can be checked is checked before any compute.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

import torch
import yaml

from . import storage
from .config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from .logs import log_event, setup_logging
from .core.metrics import AccuracyRecord, aggregate_over_seeds, format_matrix, summary

log = logging.getLogger("inflora_ray.run")


class PreflightError(RuntimeError):
    """Something that would make the run fail, found before any compute; the message says what to fix."""


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


# ----------------------------------------------------------------------------------------- preflight
def check_model(cfg: Config) -> int:
    """Build the architecture on the meta device (no weights, no memory) to check rank vs layer width."""
    import timm

    kwargs = dict(num_classes=0, img_size=cfg.model.img_size, **cfg.model.kwargs)
    try:
        with torch.device("meta"):
            model = timm.create_model(cfg.model.name, pretrained=False, **kwargs)
    except Exception as e:
        raise PreflightError(f"model: cannot build {cfg.model.name!r} with kwargs {cfg.model.kwargs}: {e}") from None
    if cfg.model.weights_file is not None and cfg.model.weights_file.startswith("builtin:"):
        from .core.model import check_builtin_weights
        try:
            check_builtin_weights(cfg.model)
        except ValueError as e:
            raise PreflightError(str(e)) from None
    dim = int(getattr(model, "embed_dim", 0))
    if cfg.method.name != "linear-probe" and cfg.method.rank > dim:
        raise PreflightError(f"method.rank={cfg.method.rank} is larger than the adapted layers' input dim {dim} "
                             f"of {cfg.model.name}; use method.rank <= {dim}")
    return dim


def _tcp_reachable(address: str, timeout: float = 5.0) -> None:
    if address in ("auto", "local", ""):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if host is None or port is None:
        raise PreflightError(f"RAY_ADDRESS={address!r} is not host:port, ray://host:port or 'auto'")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise PreflightError(f"cannot reach the Ray cluster at RAY_ADDRESS={address!r} ({e}); is the head node "
                             "up and the address right? Unset RAY_ADDRESS to run on a local Ray.") from None


_RAY_LOCK = threading.Lock()


def connect_ray(address: Optional[str]) -> None:
    """Use the running Ray, connect to ``address`` (RAY_ADDRESS), or start a local Ray (once per process)."""
    with _RAY_LOCK:
        _connect_ray(address)


def _connect_ray(address: Optional[str]) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        _tcp_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as e:
            raise PreflightError(f"cannot connect to Ray at {address!r}: {e}") from None
    else:
        ray.init(log_to_driver=True)


def check_resources(cfg: Config) -> None:
    """Fail if the cluster can never place the workers (unless run.wait_for_resources)."""
    import ray

    r = cfg.run
    need = {"CPU": r.num_workers * r.cpus_per_worker}
    if r.use_gpu:
        need["GPU"] = r.num_workers * r.gpus_per_worker
    have = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits_one = any(n.get("CPU", 0) >= r.cpus_per_worker and (not r.use_gpu or n.get("GPU", 0) >= r.gpus_per_worker)
                   for n in nodes)
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if (short or not fits_one) and not r.wait_for_resources:
        detail = ", ".join(f"{k}: needs {n:g}, cluster has {h:g}" for k, (n, h) in short.items()) or \
            "no single node can hold one worker"
        raise PreflightError(
            f"the cluster can never place {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU"
            f"{f', {r.gpus_per_worker:g} GPU' if r.use_gpu else ''}) ({detail}); lower run.num_workers / "
            "run.cpus_per_worker, or set run.wait_for_resources=true on an autoscaling cluster")


def _warn_local_paths(cfg: Config, tracker, in_submitted_job: bool) -> None:
    """Warn about places that only this machine sees when the run spans several."""
    import ray

    if not storage.is_uri(cfg.run.storage_path) and sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
        log_event(log, "storage_warning", level=logging.WARNING, storage_path=cfg.run.storage_path,
                  message="local storage path on a multi-node cluster: every node must see it at the same "
                          "path (NFS), else use an s3:// or gs:// URI")
    if in_submitted_job and tracker is not None and tracker.uri.startswith(("sqlite:", "file:")) \
            and not cfg.tracking.uri and "MLFLOW_TRACKING_URI" not in os.environ:
        log_event(log, "tracking_warning", level=logging.WARNING, uri=tracker.uri,
                  message="MLflow's local default store inside a submitted job lives in the job's temporary "
                          "working dir; set MLFLOW_TRACKING_URI (runtime env) or --tracking-uri")


# ----------------------------------------------------------------------------------------- the run
def default_run_name(cfg: Config, with_seed: bool = True) -> str:
    seed = f"-s{cfg.experiment.seed}" if with_seed else ""
    return f"{cfg.experiment.name}-{cfg.method.name}{seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def versions() -> dict:
    """Versions of the stack, recorded with every run."""
    import mlflow  # noqa: F401  (version only)
    import ray
    import timm

    from . import __version__
    return {"inflora_ray": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "ray": ray.__version__, "mlflow": getattr(sys.modules.get("mlflow"), "__version__", "?"),
            "python": sys.version.split()[0]}


def _print_progress(rec: dict, num_tasks: int, label: str = "") -> None:
    r = rec["report"]
    print(f"{label}[task {r['task'] + 1}/{num_tasks}] classes {r['classes'][0]}..{r['classes'][-1]}  "
          f"pooled acc {100 * r['pooled_accuracy']:.2f}%  avg inc acc {100 * r['average_incremental_accuracy']:.2f}%  "
          f"forgetting {100 * r['forgetting']:.2f}  loss {r['train_loss']:.4f}  {r['task_seconds']:.1f}s  "
          f"{r['images_per_second']:.0f} img/s  peak {r['peak_memory_mb']:.0f} MiB", flush=True)


class _ProgressWatcher(threading.Thread):
    """Prints one line per finished task as rank 0 writes the task's results (works for remote storage)."""

    def __init__(self, run_dir: str, num_tasks: int, on_task=None, interval: float = 1.0, label: str = "",
                 seen: Optional[set[int]] = None):
        super().__init__(daemon=True)
        self.run_dir, self.num_tasks, self.on_task, self.interval = run_dir, num_tasks, on_task, interval
        self.label = label
        self.seen: set[int] = set(seen or ())
        self._halt = threading.Event()

    def poll(self) -> None:
        from .distributed.worker import results_dir

        for name in storage.list_names(results_dir(self.run_dir)):
            if not (name.startswith("task_") and name.endswith(".json")):
                continue
            t = int(name[5:8])
            if t in self.seen:
                continue
            try:
                rec = storage.read_json(storage.join(results_dir(self.run_dir), name))
            except Exception:
                continue  # being written
            self.seen.add(t)
            _print_progress(rec, self.num_tasks, self.label)
            if self.on_task is not None:
                try:
                    self.on_task(rec)
                except Exception as e:  # a callback must not stop the progress lines
                    log_event(log, "on_task_error", level=logging.WARNING, task=t, error=str(e)[:300])

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.poll()


def collect_results(run_dir: str, num_tasks: int) -> tuple[list[dict], dict]:
    """Read the per-task records of a run, in order, and the summary of the latest."""
    from .distributed.worker import task_result_path

    tasks = []
    for t in range(num_tasks):
        path = task_result_path(run_dir, t)
        if not storage.exists(path):
            break
        tasks.append(storage.read_json(path))
    if not tasks:
        return [], {}
    record = AccuracyRecord(correct=[t["report"]["correct"] for t in tasks],
                            total=[t["report"]["total"] for t in tasks])
    return tasks, summary(record)


def write_final_results(run_dir: str, tasks: list[dict], summ: dict) -> None:
    """Accuracy matrix as Parquet (long format) and metrics as JSON in ``<run_dir>/results``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .distributed.worker import results_dir

    rows = {"after_task": [], "on_task": [], "accuracy": [], "correct": [], "total": [], "own_head_accuracy": []}
    for t in tasks:
        r = t["report"]
        for j, (c, n, own) in enumerate(zip(r["correct"], r["total"], r["own_head_correct"])):
            rows["after_task"].append(r["task"])
            rows["on_task"].append(j)
            rows["accuracy"].append(c / n)
            rows["correct"].append(c)
            rows["total"].append(n)
            rows["own_head_accuracy"].append(own / n)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(rows), sink)
    storage.write_bytes(storage.join(results_dir(run_dir), "accuracy_matrix.parquet"), sink.getvalue().to_pybytes())
    per_task = [{k: v for k, v in t["report"].items() if k not in ("correct", "total", "own_head_correct")}
                for t in tasks]
    storage.write_json(storage.join(results_dir(run_dir), "metrics.json"),
                       {**summ, "tasks": per_task, "complete": len(tasks)})


def print_final_table(name: str, summ: dict, num_tasks: int) -> None:
    done = len(summ.get("accuracy_matrix", []))
    print(f"\n== {name}: {done}/{num_tasks} tasks ==")
    if not done:
        return
    print("accuracy matrix (%), row = after task i, column = test set of task j:")
    print(format_matrix(summ["accuracy_matrix"]))
    print(f"final accuracy A_T            {100 * summ['final_accuracy']:.2f}%")
    print(f"average incremental accuracy  {100 * summ['average_incremental_accuracy']:.2f}%")
    if done > 1:
        print(f"forgetting                    {100 * summ['forgetting']:.2f}")
        print(f"backward transfer             {100 * summ['backward_transfer']:.2f}")
    sys.stdout.flush()


def run_experiment(cfg: Config, name: Optional[str] = None, *, resume: bool = False,
                   stop_after_task: Optional[int] = None, start_from: Optional[str] = None,
                   address: Optional[str] = None, on_task=None, quiet_table: bool = False,
                   parent_run_id: Optional[str] = None, label: str = "",
                   train_callbacks: Optional[list] = None) -> RunResult:
    """Run (or resume) a continual experiment as a Ray Train job and return its results.

    Raises :class:`PreflightError` (or ``OSError`` for storage) before any compute if the model, storage,
    checkpoint, tracking server or cluster cannot work, and ``RuntimeError`` if training fails beyond
    ``run.max_failures``. MLflow problems after the start never stop training (see ``RunResult``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .data import build_benchmark
    from .distributed.worker import results_dir, train_worker
    from .tracking.mlflow_runs import Tracker, TrackingUnavailable, check_server

    check_model(cfg)
    in_submitted_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if in_submitted_job and not (storage.is_uri(cfg.run.storage_path) or os.path.isabs(cfg.run.storage_path)):
        raise PreflightError(f"run.storage_path={cfg.run.storage_path!r} is relative: under `ray job submit` it would "
                             "land in the job's temporary copy of the working dir and be lost; give --storage-path "
                             "an absolute shared path (NFS) or an s3:// / gs:// URI")
    storage_path = storage.absolute(cfg.run.storage_path)
    name = name or cfg.run.name or default_run_name(cfg)
    run_dir = storage.join(storage_path, name)
    storage.check_writable(storage_path)
    if not resume and storage.exists(run_dir):
        raise PreflightError(f"run {name!r} already exists in {storage_path}; continue it with --resume {name} "
                             "or choose another run.name")
    if start_from is not None and not storage.exists(storage.join(start_from, "state.pt")):
        raise PreflightError(f"--start-from {start_from!r}: no inflora-ray checkpoint there (state.pt missing)")
    try:
        benchmark = build_benchmark(cfg.data, cfg.model.img_size, model=cfg.model)
    except (OSError, ValueError) as e:
        raise PreflightError(f"data: {e}") from None
    if stop_after_task is not None and not 0 <= stop_after_task < benchmark.num_tasks:
        raise PreflightError(f"--stop-after-task {stop_after_task}: must be in 0..{benchmark.num_tasks - 1}")
    tracker = None
    if cfg.tracking.enabled:
        tracker = Tracker(cfg)
        try:
            check_server(tracker.uri)
        except TrackingUnavailable as e:
            raise PreflightError(str(e)) from None
    connect_ray(address)
    check_resources(cfg)
    _warn_local_paths(cfg, tracker, in_submitted_job)

    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name))
    record = {"name": name, "class_order": benchmark.class_order, "tasks": benchmark.tasks,
              "dataset_manifest": benchmark.manifest, "versions": versions(), "start_from": start_from,
              "num_workers": cfg.run.num_workers}
    tracking_file = storage.join(results_dir(run_dir), "tracking.json")
    if tracker is not None:
        previous = storage.read_json(tracking_file) if resume and storage.exists(tracking_file) else {}
        try:
            tracker.start(name, record, parent_run_id=parent_run_id, resume_run_id=previous.get("run_id"))
        except Exception as e:
            raise PreflightError(f"MLflow at {tracker.uri}: cannot start the run ({type(e).__name__}: "
                                 f"{str(e)[:300]}); fix the tracking store or run with tracking.enabled=false") from None
        tracker.logged_tasks = set(previous.get("logged_tasks", []))
    if not resume:
        storage.write_bytes(storage.join(results_dir(run_dir), "config.yaml"), cfg.to_yaml().encode())
        storage.write_json(storage.join(results_dir(run_dir), "record.json"), record)
    if tracker is not None:
        storage.write_json(tracking_file, {"uri": tracker.uri, "run_id": tracker.run_id,
                                           "experiment": tracker.experiment_name,
                                           "logged_tasks": sorted(tracker.logged_tasks)})
    log_event(log, "run_start", name=name, run_dir=run_dir, workers=cfg.run.num_workers, resume=resume,
              method=cfg.method.name, benchmark=cfg.data.benchmark, tasks=benchmark.num_tasks,
              mlflow_run_id=tracker.run_id if tracker else None)

    def task_done(rec: dict) -> None:
        if tracker is not None:
            tracker.log_task(rec, run_dir)
        if on_task is not None:
            on_task(rec)

    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = cfg.run.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run_dir, "stop_after_task": stop_after_task,
                           "start_from": start_from},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
                             callbacks=list(train_callbacks or [])),
    )
    watcher = _ProgressWatcher(run_dir, benchmark.num_tasks, on_task=task_done, label=label,
                               seen=tracker.logged_tasks if tracker else None)
    watcher.start()
    error = None
    try:
        trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and friends
        error = e
    finally:
        watcher.stop()
    tasks, summ = collect_results(run_dir, benchmark.num_tasks)
    if tasks:
        write_final_results(run_dir, tasks, summ)
    if tracker is not None:
        tracker.finish(run_dir, summ, failed=error is not None)
    if not quiet_table:
        print_final_table(name, summ, benchmark.num_tasks)
    if tracker is not None and tracker.lost:
        print(f"{label}warning: MLflow tracking at {tracker.uri} was lost during the run ({tracker.lost}); "
              f"training went on and every result is in {results_dir(run_dir)}", file=sys.stderr, flush=True)
    if error is not None:
        raise RuntimeError(f"run {name!r} failed after {len(tasks)} task(s): {type(error).__name__}: {error}\n"
                           f"resume it with: python -m inflora_ray.run --resume {name} "
                           f"run.storage_path={cfg.run.storage_path}") from error
    log_event(log, "run_end", name=name, tasks_done=len(tasks), results=results_dir(run_dir),
              mlflow_run_id=tracker.run_id if tracker else None, tracking_lost=tracker.lost if tracker else None)
    return RunResult(run_dir=run_dir, name=name, tasks=tasks, summary=summ,
                     mlflow_run_id=tracker.run_id if tracker else None,
                     tracking_lost=tracker.lost if tracker else None)


def run_seeds(cfg: Config, seeds: list[int], name: Optional[str] = None, **kwargs) -> dict:
    """Run one experiment per seed, concurrently where the cluster has room, under an MLflow parent run
    that records mean +- std of the final metrics. Returns {"runs": {seed: RunResult|None}, "aggregate": ...}."""
    import concurrent.futures as cf

    from .tracking.mlflow_runs import finish_parent, start_parent

    base = name or cfg.run.name or default_run_name(cfg, with_seed=False)
    connect_ray(kwargs.get("address"))  # once, before the seeds' threads
    parent = start_parent(cfg, base, seeds) if cfg.tracking.enabled else None
    results: dict[int, Optional[RunResult]] = {}

    def one(seed: int) -> RunResult:
        c = dataclasses.replace(cfg, experiment=dataclasses.replace(cfg.experiment, seed=seed))
        return run_experiment(c, f"{base}-seed{seed}", parent_run_id=parent[1] if parent else None,
                              label=f"[seed {seed}] ", quiet_table=True, **kwargs)

    with cf.ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        futures = {pool.submit(one, s): s for s in seeds}
        for fut in cf.as_completed(futures):
            seed = futures[fut]
            try:
                results[seed] = fut.result()
            except Exception as e:
                print(f"[seed {seed}] error: {e}", file=sys.stderr, flush=True)
                results[seed] = None
    agg = aggregate_over_seeds([r.summary if r else None for _, r in sorted(results.items())])
    if parent is not None:
        finish_parent(parent[0], agg, all_ok=all(results.values()))
    print(f"\n== {base}: {len(seeds)} seeds ==")
    for key in ("final_accuracy", "average_incremental_accuracy", "forgetting"):
        if f"{key}_mean" in agg:
            print(f"{key:30s} {100 * agg[f'{key}_mean']:.2f} +- {100 * agg[f'{key}_std']:.2f}")
    if any(r is None for r in results.values()):
        failed = sorted(s for s, r in results.items() if r is None)
        raise RuntimeError(f"seeds {failed} failed (see above); the others finished")
    return {"runs": results, "aggregate": agg, "parent_run_id": parent[1] if parent else None}


def load_run_config(storage_path: str, run: str, overrides: list[str]) -> tuple[Config, str]:
    """The stored config of run ``run`` (a name under ``storage_path``, or a run directory), with overrides."""
    from .distributed.worker import results_dir

    if storage.exists(storage.join(results_dir(run), "config.yaml")):
        run_dir = run
        storage_path, name = run.rstrip("/").rsplit("/", 1) if "/" in run else (".", run)
    else:
        name = run
        run_dir = storage.join(storage.absolute(storage_path), run)
    path = storage.join(results_dir(run_dir), "config.yaml")
    if not storage.exists(path):
        raise PreflightError(f"--resume {run!r}: no run found at {run_dir} (no results/config.yaml); give the run "
                             f"name and the same run.storage_path, or the run directory")
    data = yaml.safe_load(storage.read_bytes(path))
    data.setdefault("run", {})["storage_path"] = storage_path
    apply_overrides(data, overrides)
    return config_from_dict(data), name


# ----------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m inflora_ray.run",
        description="Run an InfLoRA continual-learning experiment as a Ray Train job.",
        epilog="Overrides are section.key=value, e.g. method.rank=8 train.epochs=3 run.num_workers=2.")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    p.add_argument("--config", default="quickstart", help="preset name or YAML file (default: quickstart)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (DDP ranks); = run.num_workers")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker; = run.use_gpu")
    p.add_argument("--cpus-per-worker", type=float, help="= run.cpus_per_worker")
    p.add_argument("--storage-path", help="local dir, NFS path or s3:// / gs:// URI; = run.storage_path")
    p.add_argument("--name", help="run name (default: <experiment>-<method>-s<seed>-<time>); = run.name")
    p.add_argument("--max-failures", type=int, help="worker failures to recover from; = run.max_failures")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped run (name or run directory)")
    p.add_argument("--start-from", metavar="CHECKPOINT", help="start a new run from a checkpoint directory")
    p.add_argument("--stop-after-task", type=int, metavar="K", help="stop after task K (0-based)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--seeds", help="comma-separated seeds, run concurrently under one MLflow parent run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else a local "
                                          "store in the working directory); = tracking.uri")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow; = tracking.enabled=false")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _flag_overrides(args) -> list[str]:
    out = []
    for flag, key in (("num_workers", "run.num_workers"), ("use_gpu", "run.use_gpu"),
                      ("cpus_per_worker", "run.cpus_per_worker"), ("storage_path", "run.storage_path"),
                      ("name", "run.name"), ("max_failures", "run.max_failures"),
                      ("tracking_uri", "tracking.uri")):
        v = getattr(args, flag)
        if v is not None:
            out.append(f"{key}={json.dumps(v) if not isinstance(v, str) else v}")
    if args.no_tracking:
        out.append("tracking.enabled=false")
    return out


def run_cli(body, usage_errors: tuple = ()) -> int:
    """Run a CLI body: exit 0 on success, 2 on bad input found before compute, 1 if the run failed."""
    try:
        body()
    except (ConfigError, PreflightError, OSError, *usage_errors) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args) -> None:
    overrides = list(args.overrides) + _flag_overrides(args)
    if args.resume:
        storage_path = load_config(args.config, overrides).run.storage_path
        cfg, name = load_run_config(storage_path, args.resume, overrides)
    else:
        cfg, name = load_config(args.config, overrides), None
    if args.print_config:
        print(cfg.to_yaml())
        return
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.seeds:
        if args.resume:
            raise PreflightError("--seeds cannot be combined with --resume; resume each seed's run by name")
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise PreflightError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        run_seeds(cfg, seeds, name, stop_after_task=args.stop_after_task, start_from=args.start_from,
                  address=address)
    else:
        run_experiment(cfg, name, resume=bool(args.resume), stop_after_task=args.stop_after_task,
                       start_from=args.start_from, address=address)


if __name__ == "__main__":
    sys.exit(main())
