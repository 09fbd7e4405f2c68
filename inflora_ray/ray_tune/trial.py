"""One Ray Tune trial of a sweep: the sampled config run with K seeds (K continual runs side by side), whose
per-task results are averaged over the seeds and sent to Tune once every seed has finished that task.

The means after the sweep's last task are sent only after every seed's run has ended (results written,
MLflow run closed), so Tune's stop at the end of the horizon never cuts a run short. A trial that Tune
restarts (its process or node was lost) resumes each seed's run from its last task checkpoint; a seed whose
run failed for good (``run.max_failures`` spent, or an error no restart can fix) is not run again.
"""
from __future__ import annotations

import math
import queue
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Optional

from .. import storage
from ..config import Config, config_from_dict
from ..logs import setup_logging
from ..ray_train.errors import NonRetryableError
from ..ray_train.faults import exit_trial_once
from ..ray_train.launch import RunContext, RunOptions, run_experiment
from ..results import RESULT, read_metrics, read_task_result
from ..rundir import RunDir, run_name
from ..training.state import task_metrics
from .search_space import check_sample

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


def _check_not_failed_before(run: RunDir, metrics: dict | None) -> None:
    """A seed's run that ended failed in an earlier attempt of this trial is not run again: the retry could
    only repeat the failure (its own ``run.max_failures`` were spent)."""
    if metrics is not None and metrics.get("status") == "failed":
        raise NonRetryableError(f"run {run.name!r} of this trial failed in an earlier attempt (see its "
                                f"results/metrics.json and the trial's log); a trial retry is not run again")


class TrialStop:
    """Whether Ray Tune has asked the trial running in this process to stop (its scheduler stopped it, or the
    sweep is stopping); the trial sends its metrics through :meth:`send`.

    Tune asks a trial to stop between two of its results, while the trial's thread waits in
    ``ray.tune.report``, which then leaves with ``SystemExit``. That happens before Tune removes the trial's
    resources, which kills the Ray Train controllers of the trial's runs: a run that fails once
    :meth:`requested` is true was cut off by the stop."""

    def __init__(self):
        self._stopped = threading.Event()

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
        """True once Tune has asked this trial to stop."""
        return self._stopped.is_set()


def run_trial(params: dict, *, plan: TrialPlan) -> None:
    """The Tune trainable: run the sampled config with the plan's seeds and send per-task means to Tune."""
    import ray.tune

    setup_logging()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = check_sample(config_from_dict(plan.base), params)
    cfg = cfg.with_values({"run.storage_path": plan.trial_storage, "tracking.sweep_id": plan.sweep})
    seeds = plan.seeds(cfg)
    stop = TrialStop()
    results: queue.Queue = queue.Queue()
    errors: dict[int, BaseException] = {}

    def one(seed: int) -> None:
        name = plan.run_name(trial_id, seed)
        run = RunDir(storage.join(plan.trial_storage, name))
        try:
            resume = storage.exists(run.config)  # Tune restarted this trial: continue from the last checkpoint
            if resume:
                metrics = read_metrics(run)  # read once: failed before? finished already?
                _check_not_failed_before(run, metrics)
                for t in run.finished_tasks():  # sent again: the restarted trial's Tune session starts empty
                    results.put((seed, read_task_result(run, t)))
                if metrics is not None and metrics.get("complete", 0) >= plan.horizon:
                    return
            run_experiment(cfg.with_values({"experiment.seed": seed}),
                           RunOptions(name=name, resume=resume, stop_after_task=plan.horizon - 1),
                           RunContext(parent_run_id=plan.parent_run_id, quiet_table=True, label=f"[{name}] ",
                                      on_task=lambda rec: results.put((seed, rec)), data=plan.data,
                                      stop_requested=stop.requested, sole_driver=True))
        except BaseException as e:  # raised by the trial thread once every seed has ended
            errors[seed] = e

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
        seed, err = sorted(errors.items())[0]
        raise RuntimeError(f"trial {trial_id}: seed(s) {sorted(errors)} failed; seed {seed}: "
                           f"{type(err).__name__}: {err}") from err


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
