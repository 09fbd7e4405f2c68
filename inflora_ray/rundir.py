"""The layout of a run's directory and of a sweep's directory: every path of their files is made here.

A run directory (``<run.storage_path>/<run name>``, a local path or an ``s3://`` / ``gs://`` URI)::

    checkpoint_task<TTT>/                 Ray Train checkpoint after task TTT: state.pt, meta.json
    checkpoint_task<TTT>_epoch<EEE>/      mid-task checkpoint (run.checkpoint_every_epochs)
    results/config.yaml                   the resolved config (what --resume reads)
    results/record.json                   class order, tasks, dataset manifest, versions
    results/tracking.json                 MLflow run id and the tasks already logged
    results/task_<TTT>.json               task TTT's report and the metrics after it (rank 0)
    results/adapters_task_<TTT>.pt        task TTT's finished adapter (A, B_k, B_v per layer)
    results/metrics.json                  final metrics, per-task figures
    results/accuracy_matrix.parquet       the accuracy matrix in long format

A sweep directory (``<run.storage_path>/<sweep name>``) holds Ray Tune's own files, ``sweep.json``, the
trials' run directories under ``runs/``, ``best_config.yaml`` and ``trials.csv`` / ``trials.parquet``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import storage
from .core.metrics import AccuracyRecord, summary

STATE_FILE = "state.pt"  # inside a checkpoint directory: the learner's state (torch.save, tensors only)
META_FILE = "meta.json"  # inside a checkpoint directory: the metrics reported with it
_CHECKPOINT_PREFIX = "checkpoint_task"


def checkpoint_name(task: int, epoch: Optional[int] = None) -> str:
    """Directory name of the checkpoint after task ``task`` (or after epoch ``epoch`` of it)."""
    name = f"{_CHECKPOINT_PREFIX}{task:03d}"
    return name if epoch is None else f"{name}_epoch{epoch:03d}"


def is_checkpoint(path: str) -> bool:
    """True if ``path`` is an inflora-ray checkpoint directory (it holds the learner state)."""
    return storage.exists(storage.join(path, STATE_FILE))


@dataclass(frozen=True)
class RunDir:
    """The files of one run, under ``path``."""
    path: str

    @classmethod
    def of(cls, storage_path: str, name: str) -> "RunDir":
        """The run ``name`` under ``storage_path`` (made absolute)."""
        return cls(storage.join(storage.absolute(storage_path), name))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def results(self) -> str:
        return storage.join(self.path, "results")

    def result(self, filename: str) -> str:
        """A file in ``results/``."""
        return storage.join(self.results, filename)

    @property
    def config(self) -> str:
        return self.result("config.yaml")

    @property
    def record(self) -> str:
        return self.result("record.json")

    @property
    def tracking(self) -> str:
        return self.result("tracking.json")

    @property
    def metrics(self) -> str:
        return self.result("metrics.json")

    @property
    def accuracy_matrix(self) -> str:
        return self.result("accuracy_matrix.parquet")

    def task_result(self, task: int) -> str:
        return self.result(f"task_{task:03d}.json")

    def adapters(self, task: int) -> str:
        return self.result(f"adapters_task_{task:03d}.pt")

    @property
    def fault_marker(self) -> str:
        """Written once when a test's injected fault fired, so it fires only once per run."""
        return storage.join(self.path, ".fault_injected")

    def latest_task_checkpoint(self) -> Optional[str]:
        """The last task-boundary checkpoint directory, if any."""
        names = [n for n in storage.list_names(self.path) if n.startswith(_CHECKPOINT_PREFIX) and "_epoch" not in n]
        return storage.join(self.path, sorted(names)[-1]) if names else None

    def finished_tasks(self) -> list[int]:
        """Tasks whose ``task_<TTT>.json`` has been written, in order."""
        out = []
        for name in storage.list_names(self.results):
            if name.startswith("task_") and name.endswith(".json") and name[5:8].isdigit():
                out.append(int(name[5:8]))
        return sorted(out)

    # ------------------------------------------------------------------------------------- results I/O
    def collect_results(self, num_tasks: int) -> tuple[list[dict], dict]:
        """The per-task records, in order up to the first missing one, and the summary of the latest."""
        tasks = []
        for t in range(num_tasks):
            path = self.task_result(t)
            if not storage.exists(path):
                break
            tasks.append(storage.read_json(path))
        if not tasks:
            return [], {}
        record = AccuracyRecord(correct=[t["report"]["correct"] for t in tasks],
                                total=[t["report"]["total"] for t in tasks])
        return tasks, summary(record)

    def write_final_results(self, tasks: list[dict], summ: dict) -> None:
        """The accuracy matrix as Parquet (long format) and the metrics as JSON."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows: dict[str, list] = {"after_task": [], "on_task": [], "accuracy": [], "correct": [], "total": [],
                                 "own_head_accuracy": []}
        for t in tasks:
            r = t["report"]
            for j, (c, n, own) in enumerate(zip(r["correct"], r["total"], r["own_head_correct"])):
                for key, value in (("after_task", r["task"]), ("on_task", j), ("accuracy", c / n), ("correct", c),
                                   ("total", n), ("own_head_accuracy", own / n)):
                    rows[key].append(value)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(rows), sink)
        storage.write_bytes(self.accuracy_matrix, sink.getvalue().to_pybytes())
        per_task = [{k: v for k, v in t["report"].items() if k not in ("correct", "total", "own_head_correct")}
                    for t in tasks]
        storage.write_json(self.metrics, {**summ, "tasks": per_task, "complete": len(tasks)})


@dataclass(frozen=True)
class SweepDir:
    """The files of one sweep, under ``path``."""
    path: str

    @classmethod
    def of(cls, storage_path: str, name: str) -> "SweepDir":
        return cls(storage.join(storage.absolute(storage_path), name))

    @property
    def record(self) -> str:
        return storage.join(self.path, "sweep.json")

    @property
    def trials_root(self) -> str:
        """Storage path under which every trial's run directory lives."""
        return storage.join(self.path, "runs")

    def trial(self, trial_name: str) -> RunDir:
        return RunDir(storage.join(self.trials_root, trial_name))

    @property
    def best_config(self) -> str:
        return storage.join(self.path, "best_config.yaml")

    @property
    def table_files(self) -> tuple[str, str]:
        """The trial table as CSV and as Parquet."""
        return storage.join(self.path, "trials.csv"), storage.join(self.path, "trials.parquet")
