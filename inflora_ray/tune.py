"""``python -m inflora_ray.tune``: Ray Tune sweeps where every trial is a full continual run (a Ray Train job).

Trials report after every task (``tasks_done`` is the time attribute), so ASHA stops bad trials at task
boundaries. Every trial is an MLflow child run of the sweep's parent run, which also gets the table of all
trials and the best config as YAML (accepted by ``python -m inflora_ray.run --config``).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from . import storage
from .config import Config, ConfigError, config_from_dict, load_config
from .logs import log_event, setup_logging
from .run import PreflightError, check_model, connect_ray, run_cli, run_experiment

log = logging.getLogger("inflora_ray.tune")

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
DEFAULT_METRIC = "average_incremental_accuracy"
METRICS = ("average_incremental_accuracy", "pooled_accuracy", "forgetting", "backward_transfer", "train_loss")


class SpaceError(ValueError):
    """An invalid search-space file; the message names the parameter and what to fix."""


# ----------------------------------------------------------------------------------------- search spaces
@dataclass
class Param:
    """One searched config field: ``key`` (e.g. ``method.rank``), distribution and its arguments."""
    key: str
    kind: str
    values: list


@dataclass
class SearchSpace:
    params: list[Param]
    metric: str = DEFAULT_METRIC
    mode: str = "max"
    description: str = ""

    def to_tune(self) -> dict:
        """The Ray Tune param_space (flat keys)."""
        from ray import tune

        out = {}
        for p in self.params:
            if p.kind == "choice":
                out[p.key] = tune.choice(p.values)
            elif p.kind == "grid":
                out[p.key] = tune.grid_search(p.values)
            elif p.kind == "uniform":
                out[p.key] = tune.uniform(*p.values)
            elif p.kind == "loguniform":
                out[p.key] = tune.loguniform(*p.values)
            elif p.kind == "randint":
                out[p.key] = tune.randint(p.values[0], p.values[1] + 1)  # inclusive upper bound in the file
        return out


def valid_param_keys() -> list[str]:
    """Every config field a space may search (flattened ``section.key``)."""
    from .tracking.mlflow_runs import flatten

    keys = flatten(dataclasses.asdict(Config()))
    return sorted(k for k in keys if not k.startswith(("run.", "tracking.", "debug.")))


def load_space(path: str, base: Config) -> SearchSpace:
    """Read and validate a search-space YAML against the base config; raises :class:`SpaceError`."""
    try:
        data = yaml.safe_load(open(path))
    except FileNotFoundError:
        raise SpaceError(f"--space: file not found: {path!r}") from None
    except yaml.YAMLError as e:
        raise SpaceError(f"--space {path!r}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not data["params"]:
        raise SpaceError(f"{path}: expected a mapping with a non-empty 'params:' section")
    unknown_top = sorted(set(data) - {"params", "metric", "mode", "description"})
    if unknown_top:
        raise SpaceError(f"{path}: unknown top-level key(s) {unknown_top}; valid: params, metric, mode, description")
    metric, mode = data.get("metric", DEFAULT_METRIC), data.get("mode", "max")
    if metric not in METRICS:
        raise SpaceError(f"{path}: metric {metric!r} is not reported per task; choose one of {list(METRICS)}")
    if mode not in ("max", "min"):
        raise SpaceError(f"{path}: mode must be 'max' or 'min', got {mode!r}")
    valid = valid_param_keys()
    params = []
    for key, spec in data["params"].items():
        if key not in valid:
            raise SpaceError(f"{path}: unknown parameter {key!r}; valid parameters are {valid}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SpaceError(f"{path}: {key}: expected one of {{choice: [...]}}, {{grid: [...]}}, "
                             f"{{uniform: [low, high]}}, {{loguniform: [low, high]}}, {{randint: [low, high]}}; "
                             f"got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{path}: {key}: {kind} needs a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise SpaceError(f"{path}: {key}: {kind} needs [low, high] numbers, got {values!r}")
            low, high = values
            if low > high:
                raise SpaceError(f"{path}: {key}: low {low} > high {high}")
            if kind == "loguniform" and low <= 0:
                raise SpaceError(f"{path}: {key}: loguniform needs low > 0, got {low}")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise SpaceError(f"{path}: {key}: randint needs integer bounds, got {values!r}")
        params.append(Param(key, kind, list(values)))
    space = SearchSpace(params, metric, mode, str(data.get("description", "")))
    _check_values_against_config(space, base, path)
    return space


def _extremes(p: Param) -> list:
    return p.values if p.kind in ("choice", "grid") else [p.values[0], p.values[1]]


def _check_values_against_config(space: SearchSpace, base: Config, path: str) -> None:
    """Every listed value (and both bounds of ranges) must make a valid config, before any trial starts."""
    for p in space.params:
        for v in _extremes(p):
            try:
                cfg = apply_params(base, {p.key: v})
                check_model(cfg)
            except (ConfigError, PreflightError) as e:
                raise SpaceError(f"{path}: {p.key}={v!r} gives an invalid config: {e}") from None


def apply_params(base: Config, params: dict[str, Any]) -> Config:
    """The base config with flat ``section.key`` values set, validated."""
    data = base.to_dict()
    for key, value in params.items():
        node = data
        *parents, leaf = key.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value.item() if hasattr(value, "item") else value
    return config_from_dict(data)


# ----------------------------------------------------------------------------------------- the trial
def _trial(params: dict, *, base: dict, sweep: str, trial_storage: str, parent_run_id: Optional[str],
           stop_after_task: Optional[int]) -> None:
    """One Tune trial: a full continual run whose per-task reports reach Tune through TuneReportCallback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    setup_logging()
    cfg = apply_params(config_from_dict(base), params)
    name = ray.tune.get_context().get_trial_id()
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, storage_path=trial_storage, name=name),
                              tracking=dataclasses.replace(cfg.tracking, sweep_id=sweep))
    resume = storage.exists(storage.join(trial_storage, name, "results", "config.yaml"))
    run_experiment(cfg, name, resume=resume, stop_after_task=stop_after_task, parent_run_id=parent_run_id,
                   train_callbacks=[TuneReportCallback()], quiet_table=True, label=f"[{name}] ")


def _trial_resources() -> dict:
    # The trial function only drives a TorchTrainer whose workers reserve their own resources.
    return {"CPU": 0.01}


# ----------------------------------------------------------------------------------------- the sweep
def default_concurrency(cfg: Config) -> int:
    """How many trials fit on the cluster at once (each needs its trainer's worker resources)."""
    import ray

    have = ray.cluster_resources()
    per_trial_cpu = cfg.run.num_workers * cfg.run.cpus_per_worker
    n = int(have.get("CPU", 0) // per_trial_cpu)
    if cfg.run.use_gpu:
        n = min(n, int(have.get("GPU", 0) // (cfg.run.num_workers * cfg.run.gpus_per_worker)))
    return max(1, n)


def trial_table(results, space: SearchSpace, num_tasks: int) -> list[dict]:
    """One row per trial: parameters, last reported metrics, tasks done, status."""
    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id") or (r.path.rstrip("/").rsplit("/", 1)[-1] if r.path else None),
               "status": "error" if r.error else ("completed" if m.get("tasks_done") == num_tasks
                                                  else "stopped_early"),
               "tasks_done": m.get("tasks_done", 0)}
        row.update({f"param.{p.key}": r.config.get(p.key) for p in space.params})
        for k in ("pooled_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer"):
            v = m.get(k)
            row[k] = float(v) if v is not None else math.nan
        rows.append(row)
    return rows


def run_sweep(cfg: Config, space: SearchSpace, *, name: Optional[str] = None, num_samples: int = 1,
              max_concurrent: Optional[int] = None, scheduler: str = "asha", search: str = "random",
              first_tasks: Optional[int] = None, resume: bool = False, address: Optional[str] = None,
              grace_period: int = 1, reduction_factor: float = 2.0) -> dict:
    """Run a sweep; returns {"best_config": Config, "best_metrics": dict, "rows": [...], "final": RunResult?}."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .data import build_benchmark
    from .tracking.mlflow_runs import Tracker, TrackingUnavailable, check_server

    if search == "grid" and any(p.kind not in ("grid", "choice") for p in space.params):
        raise SpaceError("--search grid needs every parameter as grid: or choice: (finite values)")
    if search == "optuna":
        if any(p.kind == "grid" for p in space.params):
            raise SpaceError("--search optuna cannot expand grid: parameters; use choice: instead")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise PreflightError("--search optuna needs the optuna package: pip install 'inflora-ray[optuna]'") from None
    check_model(cfg)
    num_tasks = build_benchmark(cfg.data, cfg.model.img_size, model=cfg.model).num_tasks
    if first_tasks is not None and not 1 <= first_tasks <= num_tasks:
        raise PreflightError(f"--first-tasks {first_tasks}: must be in 1..{num_tasks}")
    horizon = first_tasks or num_tasks
    storage_path = storage.absolute(cfg.run.storage_path)
    name = name or f"sweep-{cfg.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = storage.join(storage_path, name)
    storage.check_writable(storage_path)
    if resume and not storage.exists(sweep_dir):
        raise PreflightError(f"--resume: no sweep {name!r} in {storage_path}")
    if not resume and storage.exists(sweep_dir):
        raise PreflightError(f"sweep {name!r} already exists in {storage_path}; use --resume or another --name")
    tracker = None
    if cfg.tracking.enabled:
        tracker = Tracker(dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, sweep_id=name)))
        try:
            check_server(tracker.uri)
        except TrackingUnavailable as e:
            raise PreflightError(str(e)) from None
    connect_ray(address)

    # Trials checkpoint at task boundaries only: every report then carries the per-task metrics ASHA reads.
    base = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, checkpoint_every_epochs=0, name=None))
    parent_id = None
    sweep_file = storage.join(sweep_dir, "sweep.json")
    if tracker is not None:
        if resume and storage.exists(sweep_file):
            parent_id = storage.read_json(sweep_file).get("mlflow_parent_run_id")
            tracker.run_id = parent_id
        else:
            from mlflow.entities import Param as MParam
            run = tracker.client.create_run(tracker.experiment_id(), run_name=name,
                                            tags={**tracker.base_tags(), "seed": str(cfg.experiment.seed),
                                                  "sweep": "parent", "mlflow.runName": name})
            parent_id = tracker.run_id = run.info.run_id
            tracker.client.log_batch(parent_id, params=[
                MParam("space", json.dumps({p.key: {p.kind: p.values} for p in space.params})[:6000]),
                MParam("metric", space.metric), MParam("mode", space.mode), MParam("scheduler", scheduler),
                MParam("search", search), MParam("num_samples", str(num_samples)),
                MParam("first_tasks", str(first_tasks))], synchronous=True)
    if not resume:
        storage.write_json(sweep_file, {"name": name, "mlflow_parent_run_id": parent_id,
                                        "space": {p.key: {p.kind: p.values} for p in space.params},
                                        "metric": space.metric, "mode": space.mode, "first_tasks": first_tasks,
                                        "config": base.to_dict()})
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base.to_dict(), sweep=name, trial_storage=storage.join(sweep_dir, "runs"),
                             parent_run_id=parent_id,
                             stop_after_task=(first_tasks - 1) if first_tasks else None),
        _trial_resources())
    concurrency = max_concurrent or default_concurrency(base)
    if scheduler == "asha":
        sched = ASHAScheduler(time_attr="tasks_done", max_t=horizon, grace_period=grace_period,
                              reduction_factor=reduction_factor)
    else:
        sched = FIFOScheduler()
    search_alg = None
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=cfg.experiment.seed)
    log_event(log, "sweep_start", name=name, trials=num_samples, concurrency=concurrency, scheduler=scheduler,
              search=search, metric=space.metric, horizon=horizon, resume=resume)
    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        from ray.tune import RunConfig as TuneRunConfig
        tuner = tune.Tuner(
            trainable, param_space=space.to_tune(),
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, scheduler=sched, search_alg=search_alg,
                                        num_samples=num_samples, max_concurrent_trials=concurrency),
            run_config=TuneRunConfig(name=name, storage_path=storage_path))
    results = tuner.fit()
    rows = trial_table(results, space, horizon)
    ok = [r for r in results if not r.error and r.metrics and space.metric in r.metrics]
    if not ok:
        raise RuntimeError(f"sweep {name!r}: no trial reported {space.metric}; see the trials' errors above")
    best = results.get_best_result(metric=space.metric, mode=space.mode, scope="last")
    best_params = {p.key: best.config[p.key] for p in space.params}
    best_cfg = apply_params(base, best_params)
    best_cfg = dataclasses.replace(best_cfg, run=dataclasses.replace(best_cfg.run, name=None))
    best_yaml = best_cfg.to_yaml()
    storage.write_bytes(storage.join(sweep_dir, "best_config.yaml"), best_yaml.encode())
    _write_table(sweep_dir, rows)
    print(f"\n== sweep {name}: {len(rows)} trial(s), best {space.metric} = {best.metrics[space.metric]:.4f} ==")
    for row in rows:
        params = ", ".join(f"{k[6:]}={row[k]}" for k in row if k.startswith("param."))
        print(f"  {row['trial_id']}: {row['status']:13s} tasks {row['tasks_done']}/{horizon}  "
              f"{space.metric} {row.get(space.metric, math.nan):.4f}  ({params})")
    print(f"best config: {storage.join(sweep_dir, 'best_config.yaml')}  params {best_params}")
    final = None
    if first_tasks and first_tasks < num_tasks:
        print(f"first-task protocol: running the best config over all {num_tasks} tasks")
        final = run_experiment(dataclasses.replace(best_cfg, tracking=dataclasses.replace(best_cfg.tracking,
                                                                                          sweep_id=name)),
                               f"{name}-final", parent_run_id=parent_id, label="[final] ")
    if tracker is not None:
        def do():
            import tempfile
            from pathlib import Path

            from mlflow.entities import Metric
            with tempfile.TemporaryDirectory() as d:
                for fname in ("trials.csv", "trials.parquet", "best_config.yaml"):
                    Path(d, fname).write_bytes(storage.read_bytes(storage.join(sweep_dir, fname)))
                tracker.client.log_artifacts(parent_id, d)
            ts = int(time.time() * 1000)
            metrics = [Metric(f"best_{space.metric}", float(best.metrics[space.metric]), ts, 0)]
            if final is not None:
                metrics.append(Metric("final_run_final_accuracy", float(final.summary["final_accuracy"]), ts, 0))
            tracker.client.log_batch(parent_id, metrics=metrics, synchronous=True)
            tracker.client.set_terminated(parent_id, status="FINISHED")
        tracker._guard("finishing the sweep's parent run", do)
    return {"name": name, "sweep_dir": sweep_dir, "best_config": best_cfg, "best_params": best_params,
            "best_metrics": dict(best.metrics), "rows": rows, "final": final, "mlflow_parent_run_id": parent_id,
            "results": results}


def _write_table(sweep_dir: str, rows: list[dict]) -> None:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(sweep_dir, "trials.csv"), buf.getvalue().encode())
    table = pa.table({k: [json.dumps(r.get(k)) if isinstance(r.get(k), (list, dict)) else r.get(k) for r in rows]
                      for k in keys})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(sweep_dir, "trials.parquet"), sink.getvalue().to_pybytes())


# ----------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inflora_ray.tune",
                                description="Sweep InfLoRA hyperparameters with Ray Tune; each trial is a full run.")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value for every trial")
    p.add_argument("--config", default="quickstart", help="preset name or YAML file")
    p.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per point of the space (grid: repeats)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster fits)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--search", choices=("random", "optuna", "grid"), default="random")
    p.add_argument("--first-tasks", type=int, metavar="K",
                   help="tune on the first K tasks only, then run the best config over the whole sequence")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: tasks before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor")
    p.add_argument("--name", help="sweep name (default: sweep-<experiment>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name, re-using finished trials")
    p.add_argument("--storage-path", help="= run.storage_path")
    p.add_argument("--num-workers", type=int, help="Ray Train workers per trial; = run.num_workers")
    p.add_argument("--use-gpu", action="store_true", default=None, help="= run.use_gpu")
    p.add_argument("--tracking-uri", help="MLflow tracking URI; = tracking.uri")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _main(args), usage_errors=(SpaceError,))


def _main(args) -> None:
    import os

    overrides = list(args.overrides)
    for flag, key in (("storage_path", "run.storage_path"), ("num_workers", "run.num_workers"),
                      ("use_gpu", "run.use_gpu"), ("tracking_uri", "tracking.uri")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={v if isinstance(v, str) else json.dumps(v)}")
    if args.resume and not args.name:
        raise SpaceError("--resume needs --name SWEEP")
    if args.num_samples < 1:
        raise SpaceError("--num-samples must be >= 1")
    cfg = load_config(args.config, overrides)
    space = load_space(args.space, cfg)
    run_sweep(cfg, space, name=args.name, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
              scheduler=args.scheduler, search=args.search, first_tasks=args.first_tasks, resume=args.resume,
              address=args.address or os.environ.get("RAY_ADDRESS"), grace_period=args.grace_period,
              reduction_factor=args.reduction_factor)

if __name__ == "__main__":
    sys.exit(main())
