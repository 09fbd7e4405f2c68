"""Finished runs, from run folders or from an MLflow experiment, as one type (:class:`ComparedRun`), for the
comparison table (:mod:`.report_table`). Reading never changes a run and never unpickles anything: run
folders are read through :mod:`inflora_ray.results` (YAML and JSON), MLflow runs through its client."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .. import storage
from ..config import ConfigError, flatten
from ..results import read_metrics, read_stored_config
from ..rundir import RunDir, SweepDir
from ..core.metrics import task_mean_summary
from .mlflow_runs import FINAL_MLFLOW_METRICS, RUN_STATUS_TAG, param_text
from ..redact import redact_uri
from .store import TrackingUnavailable, check_server, explain_store_error, store_call

SEED_KEY, BENCHMARK_KEY, TASKS_KEY = "experiment.seed", "data.benchmark", "data.num_tasks"
VAL_FRACTION_KEY, VAL_SEED_KEY = "data.val_fraction", "data.val_seed"
# The final metrics of the table: key in metrics.json -> the MLflow metric that holds it. Accuracy without a
# suffix is pooled (over the test images of all seen tasks together), with _task_mean the mean of the per-task
# accuracies (inflora_ray.core.metrics says which papers report which).
FINAL_METRICS = {k: m for k, m in FINAL_MLFLOW_METRICS.items() if k != "backward_transfer"}
# MLflow runs logged before the task-mean metrics existed: what they are computed from.
_TASK_MEAN_FINALS = ("final_accuracy_task_mean", "average_incremental_accuracy_task_mean")
# Convenience selections (--benchmark, --method, --sweep) -> the config key each one matches.
SELECTION_KEYS = {"benchmark": BENCHMARK_KEY, "method": "method.name", "sweep": "tracking.sweep_id"}
# Parent runs (over seeds, a sweep's, a report's) hold no result of their own.
PARENT_TAGS = ("seed", "sweep", "report")
_FILTER_EXAMPLE = "\"tags.sweep_id = 'sw1' and params.`method.rank` = '8'\""


class ReportError(ValueError):
    """Bad input to the report: no matching runs, a folder that is not a run, damaged results; the message
    says what to fix."""


@dataclass
class ComparedRun:
    """One run as the report sees it, from a run folder or an MLflow run.

    ``params``: the flat config (``method.rank``, ...), each value as an MLflow param shows it; ``metrics``:
    the final metrics (:data:`FINAL_METRICS` and ``backward_transfer``; fractions, NaN where absent);
    ``pooled``: pooled accuracy after each task."""
    name: str
    source: str  # the run folder, or "mlflow run <id>"
    params: dict[str, str]
    status: str  # finished / stopped / interrupted / failed (metrics.json, or the MLflow run's run_status tag);
    # MLflow's own RUNNING / KILLED / ... for a run that wrote no run_status
    tasks_done: int
    metrics: dict[str, float] = field(default_factory=dict)
    pooled: list[float] = field(default_factory=list)

    @property
    def num_tasks(self) -> int:
        """How many tasks the run's benchmark has (``data.num_tasks``)."""
        return int(self.params[TASKS_KEY])

    @property
    def seed(self) -> str:
        return self.params.get(SEED_KEY, "?")

    @property
    def eval_split(self) -> str:
        """What the run's accuracies were measured on: ``validation`` (a run with ``data.val_fraction`` > 0, such
        as a sweep's trial: images held out of the training data) or ``test``."""
        try:
            held_out = float(self.params.get(VAL_FRACTION_KEY) or 0) > 0
        except ValueError:  # "None": unset
            held_out = False
        return "validation" if held_out else "test"

    @property
    def finished(self) -> bool:
        """True only for a run that ended well after every task of its benchmark."""
        return self.status.lower() == "finished" and self.tasks_done >= self.num_tasks

    def summary(self) -> dict[str, float]:
        """The final metrics in the form :func:`~inflora_ray.core.metrics.aggregate_over_seeds` averages."""
        return {k: self.metrics.get(k, math.nan) for k in (*FINAL_METRICS, "backward_transfer")}


def _is_run(params: dict[str, str]) -> bool:
    """True for the settings of an inflora-ray run: a benchmark and its number of tasks."""
    return BENCHMARK_KEY in params and str(params.get(TASKS_KEY, "")).isdigit()


def _selected(params: dict[str, str], where: dict[str, str | None]) -> bool:
    return all(params.get(SELECTION_KEYS[k]) == v for k, v in where.items() if v is not None)


# ------------------------------------------------------------------------------------------- run folders
def _folder_runs(base: str, shown: str, skipped: list[str]) -> list[RunDir]:
    """The run folders directly under ``base``, and those of every sweep folder there (its trials under
    ``runs/``); every other entry is added to ``skipped`` with why (``shown``: how ``base`` is named)."""
    try:
        names = storage.list_names(base)
    except OSError as e:  # a file, or a folder that cannot be listed
        raise ReportError(f"--runs {shown}: cannot list it as a folder ({type(e).__name__}: {e})") from None
    found = []
    for name in names:
        entry = storage.join(base, name)
        if storage.exists(RunDir(entry).config):
            found.append(RunDir(entry))
        elif storage.exists(SweepDir(entry).record):
            trials = _folder_runs(SweepDir(entry).trials_root, f"{shown}/{name}/runs", skipped)
            found += trials
            if not trials:
                skipped.append(f"{name}: a sweep folder with no trial run in it yet")
        elif not name.startswith("."):
            skipped.append(f"{name}: neither a run folder (no results/config.yaml) nor a sweep folder "
                           "(no sweep.json)")
    return found


def _run_dirs(path: str, skipped: list[str]) -> list[RunDir]:
    """The runs of ``--runs PATH``: the run folder itself, the trials of a sweep folder, or the run folders and
    sweep folders' trials under a storage folder; what else is there goes to ``skipped`` with the reason."""
    root = storage.absolute(path)
    if not storage.exists(root):
        raise ReportError(f"--runs {path}: no such folder")
    if storage.exists(RunDir(root).config):
        return [RunDir(root)]
    sweep = SweepDir(root)
    inner: list[str] = []
    if storage.exists(sweep.record):
        found = _folder_runs(sweep.trials_root, f"{path}/runs", inner)
    else:
        found = _folder_runs(root, path, inner)
    if not found:
        raise ReportError(f"--runs {path}: not a run folder (it has no results/config.yaml) and it holds no run "
                          "folders or sweep folders with runs; give a run folder (<run.storage_path>/<run name>), "
                          "a sweep folder, or the storage path that holds them")
    skipped += [f"{path}/{item}" for item in inner]
    return found


def _number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _checked_metrics(data: dict, shown: str) -> tuple[str, int, dict[str, float], list[float]]:
    """Status, tasks done, final metrics and pooled accuracies of a ``metrics.json``; :class:`ReportError`
    naming the file and the field when its content is not what a run writes."""
    def bad(what: str) -> ReportError:
        return ReportError(f"{shown}: {what}; the file is damaged (a run writes it when it ends): restore it or "
                           "leave this run out of --runs")

    status, done, pooled = data.get("status"), data.get("complete"), data.get("pooled_accuracy", [])
    if not isinstance(status, str):
        raise bad(f"'status' is {status!r}, not a string such as 'finished'")
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        raise bad(f"'complete' is {done!r}, not a number of tasks")
    if not isinstance(pooled, list) or not all(_number(p) for p in pooled) or len(pooled) != done:
        raise bad(f"'pooled_accuracy' must be a list of {done} numbers (one per task done)")
    metrics = {}
    for key in (*FINAL_METRICS, "backward_transfer") if done else ():
        value = data.get(key)
        if not (_number(value) or value is None):
            raise bad(f"{key!r} is {value!r}, not a number")
        metrics[key] = math.nan if value is None else float(value)
    return status, done, metrics, [float(p) for p in pooled]


def _from_folder(run: RunDir) -> ComparedRun:
    try:
        params = {k: param_text(v) for k, v in flatten(read_stored_config(run)).items()}
        data = read_metrics(run)
    except ConfigError as e:
        raise ReportError(f"{e}: restore it, or leave this run out of --runs") from None
    if not _is_run(params):
        raise ReportError(f"{run.config}: not an inflora-ray run config (it needs {BENCHMARK_KEY} and a whole "
                          f"number {TASKS_KEY}); the stored config is damaged: leave this run out of --runs")
    if data is None:  # the run has not ended, or its driver was killed before writing the results
        return ComparedRun(run.name, run.path, params, "no results/metrics.json (running, or its driver was killed)",
                         len(run.finished_tasks()))
    status, done, metrics, pooled = _checked_metrics(data, run.metrics)
    return ComparedRun(run.name, run.path, params, status, done, metrics, pooled)


def runs_from_folders(paths: list[str], where: dict[str, str | None] | None = None,
                      skipped: list[str] | None = None) -> list[ComparedRun]:
    """The runs under ``paths`` (run folders, sweep folders, storage folders holding either) that match
    ``where`` (``{"benchmark" | "method" | "sweep": value or None}``); every entry of a storage folder that is
    neither is appended to ``skipped`` (when given) with the reason."""
    skipped = [] if skipped is None else skipped
    runs = [_from_folder(run) for path in paths for run in _run_dirs(path, skipped)]
    return [r for r in runs if _selected(r.params, where or {})]


# ------------------------------------------------------------------------------------------- MLflow
def _search(client, uri: str, experiment_id: str, filter_string: str) -> list:
    """Every run of the experiment that matches ``filter_string`` (all pages)."""
    runs, token = [], None
    while True:
        try:
            page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                      page_token=token)
        except Exception as e:  # noqa: BLE001  (a refused filter, or any store error: both become messages)
            if getattr(e, "error_code", "") == "INVALID_PARAMETER_VALUE":
                raise ReportError(f"--filter {filter_string!r}: MLflow refuses it ({str(e)[:300]}); write it in "
                                  f"MLflow's search syntax, e.g. {_FILTER_EXAMPLE}") from None
            raise TrackingUnavailable(explain_store_error(uri, "searching runs", e)) from None
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _pooled_history(client, run_id: str) -> list[float]:
    """Pooled accuracy after each task (the last value logged at each step = task index)."""
    by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, "pooled_accuracy"),
                                               key=lambda m: (m.step, m.timestamp))}
    return [by_step[s] for s in sorted(by_step)]


def _task_mean_from_history(client, run_id: str, tasks: int) -> dict[str, float]:
    """The task-mean final metrics of a run logged before they existed, from its per-task accuracy histories
    (``accuracy_task_<j>`` at step i is ``acc[i][j]``); {} when a value is missing."""
    rows: list[list] = [[None] * (i + 1) for i in range(tasks)]
    for j in range(tasks):
        for m in sorted(client.get_metric_history(run_id, f"accuracy_task_{j}"), key=lambda m: (m.step, m.timestamp)):
            if j <= m.step < tasks:
                rows[m.step][j] = m.value
    if not tasks or any(a is None for row in rows for a in row):
        return {}
    summ = task_mean_summary(rows)
    return {k: float(summ[k]) for k in _TASK_MEAN_FINALS}


def _from_mlflow(client, run) -> ComparedRun:
    pooled = _pooled_history(client, run.info.run_id)
    metrics = {k: float(run.data.metrics[m]) for k, m in FINAL_METRICS.items() if m in run.data.metrics}
    if "final_accuracy" in metrics and not any(k in metrics for k in _TASK_MEAN_FINALS):
        metrics.update(_task_mean_from_history(client, run.info.run_id, len(pooled)))
    if "final_backward_transfer" in run.data.metrics:
        metrics["backward_transfer"] = float(run.data.metrics["final_backward_transfer"])
    status = run.data.tags.get(RUN_STATUS_TAG) or run.info.status  # the run's own word, else MLflow's
    return ComparedRun(run.info.run_name or run.info.run_id, f"mlflow run {run.info.run_id}", dict(run.data.params),
                       status, len(pooled), metrics, pooled)


def runs_from_mlflow(uri: str, experiment: str, filter_string: str = "",
                     where: dict[str, str | None] | None = None) -> list[ComparedRun]:
    """The inflora-ray runs of MLflow experiment ``experiment`` at ``uri`` that match ``filter_string`` (MLflow's
    search syntax) and ``where`` (as in :func:`runs_from_folders`); parent runs are left out.
    :class:`~.store.TrackingUnavailable` when the store cannot be used, :class:`ReportError` for bad input."""
    from mlflow import MlflowClient

    check_server(uri)
    client = store_call(uri, "opening the tracking store", lambda: MlflowClient(tracking_uri=uri))
    exp = store_call(uri, f"looking up experiment {experiment!r}", lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        names = store_call(uri, "listing experiments", lambda: [e.name for e in client.search_experiments()])
        raise ReportError(f"--experiment {experiment!r}: no such experiment at {redact_uri(uri)}; it has "
                          f"{', '.join(repr(n) for n in sorted(names)[:20]) or 'none'}")
    runs = [r for r in _search(client, uri, exp.experiment_id, filter_string or "")
            if not any(r.data.tags.get(t) == "parent" for t in PARENT_TAGS)
            and _is_run(r.data.params) and _selected(r.data.params, where or {})]
    return store_call(uri, "reading the runs' metrics", lambda: [_from_mlflow(client, r) for r in runs])

