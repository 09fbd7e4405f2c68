"""What a run writes into its ``results/`` folder and how it is read back: each task's result as rank 0 writes
it, the final metrics and accuracy matrix the driver writes, and the stored config that ``--resume`` reads.
Where the files are is :class:`~inflora_ray.rundir.RunDir`'s; everything here is JSON, YAML or Parquet (the
finished adapters are ``torch.save`` files of tensors), and nothing read is ever unpickled."""
from __future__ import annotations

import io
from typing import Optional

import yaml

from . import storage
from .config import ConfigError
from .core.metrics import AccuracyCounts, summary, task_mean_summary
from .rundir import RunDir
from .yaml_io import load_yaml

RESULT, SUMMARY = "result", "summary"  # keys of a task's result file: its TaskResult, the metrics after it

# How a run ended: one word, the same in metrics.json, on its MLflow run (tag run_status) and in the report.
RUN_STATUSES = ("finished", "stopped", "interrupted", "failed")


def run_status(tasks_done: int, num_tasks: int, failed: bool = False, interrupted: bool = False) -> str:
    """How a run ended (:data:`RUN_STATUSES`): ``failed`` (an error ended it), ``interrupted`` (Ctrl-C,
    SIGTERM, or its caller stopped it; ``--resume`` continues it), ``stopped`` (it ended well, but before its
    last task: ``--stop-after-task``; ``--resume`` continues it), ``finished`` (every task done)."""
    if failed:
        return "failed"
    if interrupted:
        return "interrupted"
    return "finished" if tasks_done >= num_tasks else "stopped"


def write_task_result(run: RunDir, result: dict, counts: AccuracyCounts, own_head_counts: AccuracyCounts,
                      adapters: Optional[list] = None, **facts) -> None:
    """Write ``results/task_<t>.json`` for the task of ``result`` (a ``TaskResult.to_dict``): the result, the
    metrics after it (``counts`` up to its row), the own-head accuracy matrix and ``facts`` (world size,
    accelerator); and the task's finished adapter (``adapters``: A, B_k, B_v per layer) when it has one."""
    task = int(result["task"])
    rows = task + 1
    upto = AccuracyCounts(correct=counts.correct[:rows], total=counts.total[:rows])
    own = AccuracyCounts(correct=own_head_counts.correct[:rows], total=own_head_counts.total[:rows])
    if adapters is not None:
        import torch

        buf = io.BytesIO()
        torch.save(adapters, buf)
        storage.write_bytes(run.adapters(task), buf.getvalue())
    storage.write_json(run.task_result(task), {RESULT: result, SUMMARY: summary(upto),
                                               "own_head_accuracy_matrix": own.matrix(), **facts})


def read_task_result(run: RunDir, task: int) -> dict:
    """The content of ``results/task_<t>.json``: ``{"result": TaskResult dict, "summary": metrics, ...}``; a
    file written before the task-mean metrics existed gets them from its accuracy matrix."""
    rec = storage.read_json(run.task_result(task))
    if isinstance(rec, dict) and isinstance(rec.get(SUMMARY), dict) and isinstance(rec.get(RESULT), dict):
        fill_task_mean(rec[SUMMARY], [rec[RESULT]])
    return rec


def fill_task_mean(summ: dict, results: list[dict]) -> None:
    """Results stored before the task-mean metrics existed: add them, in place, to ``summ`` (a
    :func:`~inflora_ray.core.metrics.summary` as stored) from its ``accuracy_matrix``, and to each of
    ``results`` (``TaskResult`` dicts) by its task index. Nothing is changed where they are there already, or
    where the matrix is not a list of non-empty lists of numbers (the metrics stay absent: '-' in the report)."""
    acc = summ.get("accuracy_matrix")
    if "task_mean_accuracy" in summ or not isinstance(acc, list) or not acc or not all(
            isinstance(row, list) and row and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                 for a in row) for row in acc):
        return
    summ.update(task_mean_summary(acc))
    after = summ["task_mean_accuracy"]
    for r in results:
        t = r.get("task")
        if isinstance(t, int) and 0 <= t < len(after):
            r.setdefault("task_mean_accuracy", after[t])
            r.setdefault("average_incremental_accuracy_task_mean", sum(after[:t + 1]) / (t + 1))


def read_task_results(run: RunDir, num_tasks: int) -> tuple[list[dict], dict]:
    """The task results, in order up to the first missing one, and the summary after the latest."""
    tasks = []
    for t in range(num_tasks):
        if not storage.exists(run.task_result(t)):
            break
        tasks.append(read_task_result(run, t))
    if not tasks:
        return [], {}
    counts = AccuracyCounts(correct=[t[RESULT]["correct"] for t in tasks], total=[t[RESULT]["total"] for t in tasks])
    return tasks, summary(counts)


def write_final_results(run: RunDir, tasks: list[dict], summ: dict, status: str, eval_split: str = "test") -> None:
    """The accuracy matrix as Parquet (long format) and the metrics as JSON; ``status`` (:func:`run_status`)
    and ``incomplete`` say how the run ended and whether every task ran, ``eval_split`` what the accuracies
    were measured on (``test``, or ``validation``: images held out of the training data)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    if tasks:
        rows: dict[str, list] = {"after_task": [], "on_task": [], "accuracy": [], "correct": [], "total": [],
                                 "own_head_accuracy": []}
        for t in tasks:
            r = t[RESULT]
            for j, (c, n, own) in enumerate(zip(r["correct"], r["total"], r["own_head_correct"])):
                for key, value in (("after_task", r["task"]), ("on_task", j), ("accuracy", c / n),
                                   ("correct", c), ("total", n), ("own_head_accuracy", own / n)):
                    rows[key].append(value)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(rows), sink)
        storage.write_bytes(run.accuracy_matrix, sink.getvalue().to_pybytes())
    per_task = [{k: v for k, v in t[RESULT].items() if k not in ("correct", "total", "own_head_correct")}
                for t in tasks]
    storage.write_json(run.metrics, {**summ, "tasks": per_task, "complete": len(tasks), "status": status,
                                     "incomplete": status != "finished", "eval_split": eval_split})


def write_progress(run: RunDir, progress, epochs: int) -> None:
    """Where the task under way stands after an epoch (``progress``: its
    :class:`~inflora_ray.training.state.TaskProgress`): what the driver's progress line shows."""
    storage.write_json(run.progress, {
        "task": progress.task, "epochs_done": progress.epochs_done, "epochs": epochs,
        "loss": progress.losses[-1] if progress.losses else None, "train_seconds": progress.train_seconds,
        "train_images": progress.train_images})


def read_progress(run: RunDir) -> Optional[dict]:
    """What :func:`write_progress` wrote last (None before the first epoch, or when it cannot be read)."""
    try:
        data = storage.read_json(run.progress)
    except (OSError, ValueError):  # not written yet, or being written
        return None
    return data if isinstance(data, dict) else None


def read_metrics(run: RunDir) -> dict | None:
    """The content of ``results/metrics.json`` (JSON only, nothing is unpickled), with the task-mean metrics
    computed from its accuracy matrix when it was written before they existed (:func:`fill_task_mean`); None
    while the run has not ended; :class:`ConfigError` when it is not a JSON object."""
    if not storage.exists(run.metrics):
        return None
    try:
        data = storage.read_json(run.metrics)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{run.metrics} is not valid JSON ({str(e)[:120]}); the run's results are damaged") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{run.metrics}: expected a JSON object, got {type(data).__name__}; the run's results "
                          "are damaged")
    tasks = data.get("tasks")
    fill_task_mean(data, [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else [])
    return data


def read_stored_config(run: RunDir) -> dict:
    """The config the run stored (``results/config.yaml``) as a dict; :class:`ConfigError` when the file is
    damaged."""
    try:
        data = load_yaml(storage.read_bytes(run.config))
    except yaml.YAMLError as e:
        raise ConfigError(f"{run.config} is not valid YAML ({str(e)[:200]}); the run's stored config is "
                          "damaged") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{run.config}: expected a mapping of config sections; the run's stored config is "
                          "damaged")
    return data
