"""Ray Tune sweeps where every trial is a full continual run (a Ray Train job).

Trials report after every task (``tasks_done`` is the time attribute), so ASHA stops bad trials at task
boundaries. Every trial is an MLflow child run of the sweep's parent run, which also gets the table of all
trials and the best config as YAML (accepted by ``python -m inflora_ray.run --config``).
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

from .. import storage
from ..config import Config, ConfigError, config_from_dict
from ..logs import log_event, setup_logging
from ..rundir import RunClaimed, RunDir, SweepDir
from .launch import run_experiment
from .preflight import PreflightError, check_model, connect_ray, start_tracker
from .search_space import SearchSpace, SpaceError

log = logging.getLogger(__name__)


@dataclass
class SweepOptions:
    """How a sweep searches and schedules its trials."""
    name: Optional[str] = None  # default: sweep-<experiment>-<time>
    num_samples: int = 1  # samples per point of the space (grid: repeats)
    max_concurrent: Optional[int] = None  # default: as many trials as the cluster fits
    scheduler: str = "asha"  # "asha" or "fifo"
    search: str = "random"  # "random", "optuna" or "grid"
    first_tasks: Optional[int] = None  # tune on the first K tasks, then run the winner over all tasks
    resume: bool = False  # continue the sweep ``name``
    address: Optional[str] = None  # Ray address
    grace_period: int = 1  # ASHA: tasks before a trial can be stopped
    reduction_factor: float = 2.0  # ASHA


@dataclass
class _Sweep:
    """One sweep being run: its base config, space, directory, options, task count and MLflow parent."""
    base: Config
    space: SearchSpace
    dir: SweepDir
    opts: SweepOptions
    num_tasks: int
    tracker: object = None  # the parent run's Tracker (None without tracking)

    @property
    def horizon(self) -> int:
        """Tasks every trial runs (``--first-tasks``, else all)."""
        return self.opts.first_tasks or self.num_tasks

    @property
    def parent_id(self) -> Optional[str]:
        return self.tracker.run_id if self.tracker is not None else None


def _trial(params: dict, *, base: dict, sweep: str, trial_storage: str, parent_run_id: Optional[str],
           stop_after_task: Optional[int]) -> None:
    """One Tune trial: a full continual run whose per-task reports reach Tune through TuneReportCallback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    setup_logging()
    name = ray.tune.get_context().get_trial_id()
    cfg = config_from_dict(base).with_values({**params, "run.storage_path": trial_storage, "run.name": name,
                                              "tracking.sweep_id": sweep})
    resume = storage.exists(RunDir(storage.join(trial_storage, name)).config)  # Tune restarted this trial
    run_experiment(cfg, name, resume=resume, stop_after_task=stop_after_task, parent_run_id=parent_run_id,
                   train_callbacks=[TuneReportCallback()], quiet_table=True, label=f"[{name}] ")


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


def _check_options(space: SearchSpace, opts: SweepOptions) -> None:
    if opts.search == "grid" and any(p.kind not in ("grid", "choice") for p in space.params):
        raise SpaceError("--search grid needs every parameter as grid: or choice: (finite values)")
    if opts.search == "optuna":
        if any(p.kind == "grid" for p in space.params):
            raise SpaceError("--search optuna cannot expand grid: parameters; use choice: instead")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise PreflightError("--search optuna needs the optuna package: pip install 'inflora-ray[optuna]'") from None


def _open_parent(sw: _Sweep) -> None:
    """The sweep's MLflow parent run: created, or on resume the one recorded in ``sweep.json``."""
    tracker, opts = sw.tracker, sw.opts
    if tracker is None:
        return
    if opts.resume and storage.exists(sw.dir.record):
        tracker.run_id = storage.read_json(sw.dir.record).get("mlflow_parent_run_id")
        return
    tracker.create(opts.name, tags={"sweep": "parent"}, params={
        "space": json.dumps(sw.space.as_dict()), "metric": sw.space.metric, "mode": sw.space.mode,
        "scheduler": opts.scheduler, "search": opts.search, "num_samples": opts.num_samples,
        "first_tasks": opts.first_tasks})


def _tuner(sw: _Sweep):
    from ray import tune
    from ray.tune import RunConfig as TuneRunConfig
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base, opts = sw.base, sw.opts
    # The trial function only drives a TorchTrainer whose workers reserve their own resources.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base.to_dict(), sweep=opts.name, trial_storage=sw.dir.trials_root,
                             parent_run_id=sw.parent_id,
                             stop_after_task=(opts.first_tasks - 1) if opts.first_tasks else None),
        {"CPU": 0.01})
    if opts.resume:
        return tune.Tuner.restore(sw.dir.path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    sched = (ASHAScheduler(time_attr="tasks_done", max_t=sw.horizon, grace_period=opts.grace_period,
                           reduction_factor=opts.reduction_factor) if opts.scheduler == "asha" else FIFOScheduler())
    search_alg = None
    if opts.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=base.experiment.seed)
    return tune.Tuner(
        trainable, param_space=sw.space.to_tune(),
        tune_config=tune.TuneConfig(metric=sw.space.metric, mode=sw.space.mode, scheduler=sched, search_alg=search_alg,
                                    num_samples=opts.num_samples,
                                    max_concurrent_trials=opts.max_concurrent or default_concurrency(base)),
        run_config=TuneRunConfig(name=opts.name, storage_path=storage.absolute(base.run.storage_path)))


def run_sweep(cfg: Config, space: SearchSpace, **options) -> dict:
    """Run a sweep (``options``: :class:`SweepOptions` fields); returns ``{"best_config": Config,
    "best_params", "best_metrics", "rows": [...], "final": RunResult | None, ...}``."""
    from ..data import build_benchmark

    opts = SweepOptions(**options)
    _check_options(space, opts)
    check_model(cfg)
    num_tasks = build_benchmark(cfg.data, cfg.model.img_size, model=cfg.model).num_tasks
    if opts.first_tasks is not None and not 1 <= opts.first_tasks <= num_tasks:
        raise PreflightError(f"--first-tasks {opts.first_tasks}: must be in 1..{num_tasks}")
    opts.name = opts.name or f"sweep-{cfg.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        sweep = SweepDir.of(cfg.run.storage_path, opts.name)
    except ConfigError as e:
        raise SpaceError(f"--name: {e}") from None
    storage.check_writable(storage.absolute(cfg.run.storage_path))
    if opts.resume and not storage.exists(sweep.path):
        raise PreflightError(f"--resume: no sweep {opts.name!r} in {cfg.run.storage_path}")
    if not opts.resume and storage.exists(sweep.path):
        raise PreflightError(f"sweep {opts.name!r} already exists in {cfg.run.storage_path}; use --resume or another --name")
    tracker = start_tracker(cfg.with_values({"tracking.sweep_id": opts.name}))
    connect_ray(opts.address)

    if not opts.resume:
        try:
            sweep.claim()
        except RunClaimed as e:
            raise PreflightError(f"{e}; use --resume or another --name") from None
    # Trials checkpoint at task boundaries only: every report then carries the per-task metrics ASHA reads.
    base = cfg.with_values({"run.checkpoint_every_epochs": 0, "run.name": None})
    sw = _Sweep(base, space, sweep, opts, num_tasks, tracker)
    _open_parent(sw)
    from ..tracking import redact_config

    if not opts.resume:
        storage.write_json(sweep.record, {"name": opts.name, "mlflow_parent_run_id": sw.parent_id,
                                          "space": space.as_dict(), "metric": space.metric, "mode": space.mode,
                                          "first_tasks": opts.first_tasks,
                                          "config": redact_config(base).to_dict()})
    log_event(log, "sweep_start", name=opts.name, trials=opts.num_samples, scheduler=opts.scheduler,
              search=opts.search, metric=space.metric, horizon=sw.horizon, resume=opts.resume)
    return _conclude(sw, _tuner(sw).fit())


def _conclude(sw: _Sweep, results) -> dict:
    """Name the winner, write the table and best config, run the winner over all tasks if asked, close MLflow."""
    space, opts, sweep = sw.space, sw.opts, sw.dir
    rows = trial_table(results, space, sw.horizon)
    if not [r for r in results if not r.error and r.metrics and space.metric in r.metrics]:
        raise RuntimeError(f"sweep {opts.name!r}: no trial reported {space.metric}; see the trials' errors above")
    best = results.get_best_result(metric=space.metric, mode=space.mode, scope="last")
    best_params = {p.key: best.config[p.key] for p in space.params}
    best_cfg = sw.base.with_values({**best_params, "run.name": None})
    storage.write_bytes(sweep.best_config, best_cfg.to_yaml().encode())
    write_trial_table(sweep, rows)
    print(f"\n== sweep {opts.name}: {len(rows)} trial(s), best {space.metric} = {best.metrics[space.metric]:.4f} ==")
    for row in rows:
        params = ", ".join(f"{k[6:]}={row[k]}" for k in row if k.startswith("param."))
        print(f"  {row['trial_id']}: {row['status']:13s} tasks {row['tasks_done']}/{sw.horizon}  "
              f"{space.metric} {row.get(space.metric, math.nan):.4f}  ({params})")
    print(f"best config: {sweep.best_config}  params {best_params}")
    final = None
    if sw.horizon < sw.num_tasks:
        print(f"first-task protocol: running the best config over all {sw.num_tasks} tasks")
        final = run_experiment(best_cfg.with_values({"tracking.sweep_id": opts.name}), f"{opts.name}-final",
                               parent_run_id=sw.parent_id, label="[final] ")
    if sw.tracker is not None:
        metrics = {f"best_{space.metric}": float(best.metrics[space.metric])}
        if final is not None:
            metrics["final_run_final_accuracy"] = float(final.summary["final_accuracy"])
        sw.tracker.finish_parent(metrics, ok=True, files=(*sweep.table_files, sweep.best_config))
    return {"name": opts.name, "sweep_dir": sweep.path, "best_config": best_cfg, "best_params": best_params,
            "best_metrics": dict(best.metrics), "rows": rows, "final": final, "mlflow_parent_run_id": sw.parent_id,
            "results": results}
