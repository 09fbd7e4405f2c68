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

import hashlib
import io
import logging
import os
import pickle
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import yaml

from . import storage
from .config import ConfigError, check_name
from .core.metrics import AccuracyRecord, summary
from .logs import log_event

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # inside a checkpoint directory: the learner's state (torch.save, tensors only)
META_FILE = "meta.json"  # inside a checkpoint directory: the metrics reported with it
_CHECKPOINT_PREFIX = "checkpoint_task"
STATE_DIGEST_KEY = "state_sha256"  # in meta.json: SHA-256 of state.pt (absent in checkpoints of 0.1.0)


def checkpoint_name(task: int, epoch: Optional[int] = None) -> str:
    """Directory name of the checkpoint after task ``task`` (or after epoch ``epoch`` of it)."""
    name = f"{_CHECKPOINT_PREFIX}{task:03d}"
    return name if epoch is None else f"{name}_epoch{epoch:03d}"


def _inside(storage_path: str, name: str, what: str) -> str:
    """``<storage_path>/<name>`` after checking ``name`` and that the folder stays inside ``storage_path``."""
    check_name(name, what)
    root = storage.absolute(storage_path)
    path = storage.join(root, name)
    if not storage.is_uri(root):
        real_root, real = os.path.realpath(root), os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:  # e.g. a symlink planted under the storage path
            raise ConfigError(f"{what}: {name!r} resolves to {real}, outside the storage path {real_root}")
    return path


class RunClaimed(ConfigError):
    """Another run already holds this run's folder."""


# How long a claim on an object store waits before it checks a second time that it is the earliest one.
CLAIM_SETTLE_SECONDS = 2.0


def claim_folder(path: str, what: str) -> None:
    """Create the folder ``path`` for this process only: atomically on a file system (``mkdir``), and on an
    object store by a claim object per contender, where the first claim by name wins (best effort: it
    relies on the contenders' clocks agreeing to within the time between writing and listing)."""
    if not storage.is_uri(path):
        os.makedirs(os.path.dirname(path.rstrip("/")), exist_ok=True)
        try:
            os.mkdir(path)
        except FileExistsError:
            raise RunClaimed(f"{what} {path!r} already exists; another run holds it") from None
        return
    if storage.list_names(path):
        raise RunClaimed(f"{what} {path!r} already exists; another run holds it")
    mine = f".claim-{time.time_ns():020d}-{uuid.uuid4().hex}"
    storage.write_bytes(storage.join(path, mine), b"")
    # The earliest claim wins. A contender that read its clock before us but whose claim became visible only
    # after our listing would see itself first too: list once more after a pause longer than a write takes,
    # so that of two near-simultaneous contenders at most one still sees itself first.
    for pause in (0.0, CLAIM_SETTLE_SECONDS):
        time.sleep(pause)
        claims = sorted(n for n in storage.list_names(path) if n.startswith(".claim-"))
        if claims[0] != mine:
            raise RunClaimed(f"{what} {path!r} was claimed by another run at the same time")


def release_folder(path: str) -> None:
    """Undo :func:`claim_folder` when the run stops before writing anything: remove the folder if it holds
    nothing but claims."""
    names = storage.list_names(path)
    if any(not n.startswith(".claim-") for n in names):
        return
    if storage.is_uri(path):
        fs, _ = storage.filesystem(path)
        for n in names:
            fs.delete_file(storage.filesystem(storage.join(path, n))[1])
    else:
        os.rmdir(path)


def is_checkpoint(path: str) -> bool:
    """True if ``path`` is an inflora-ray checkpoint directory (it holds the learner state)."""
    return storage.exists(storage.join(path, STATE_FILE))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, cut short, altered, holding objects other than tensors, or
    made for another architecture; the message names it and says what is wrong."""


def write_checkpoint(directory: str, state: dict, meta: dict) -> None:
    """Save ``state`` as ``state.pt`` and ``meta`` with the SHA-256 of ``state.pt`` as ``meta.json``."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    storage.write_bytes(storage.join(directory, STATE_FILE), data)
    storage.write_json(storage.join(directory, META_FILE), {**meta, STATE_DIGEST_KEY: hashlib.sha256(data).hexdigest()})


def recorded_state_digest(directory: str) -> Optional[str]:
    """The SHA-256 of ``state.pt`` recorded in the checkpoint's ``meta.json``; None when there is none (a
    checkpoint of an earlier version)."""
    meta_path = storage.join(directory, META_FILE)
    if not storage.exists(meta_path):
        return None
    try:
        meta = storage.read_json(meta_path)
    except ValueError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}); the checkpoint is damaged") from None
    digest = meta.get(STATE_DIGEST_KEY) if isinstance(meta, dict) else None
    if digest is not None and not isinstance(digest, str):
        raise CheckpointError(f"{meta_path}: {STATE_DIGEST_KEY} is {digest!r}, not a hex digest; the checkpoint "
                              "is damaged")
    return digest


def load_state_bytes(data: bytes, shown: str) -> dict:
    """A learner state from ``torch.save`` bytes, unpickling nothing but tensors and plain containers
    (``weights_only=True``); ``shown`` names the file in errors."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise CheckpointError(f"{shown}: refused: it holds objects other than tensors and plain containers, "
                              f"which are never unpickled ({first})") from None
    except Exception as e:  # cut short, empty, not a torch file: RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(f"{shown}: cannot be read as a torch.save file ({type(e).__name__}: "
                              f"{str(e)[:160]}); it is truncated or not an inflora-ray checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{shown}: holds a {type(state).__name__}, not an inflora-ray learner state")
    return state


def read_checkpoint(directory: str, name: Optional[str] = None) -> dict:
    """The learner state in checkpoint ``directory`` after checking ``state.pt`` against the SHA-256 in
    ``meta.json`` (a checkpoint without one, from an earlier version, is read with a warning). ``name``: how
    errors name the checkpoint (default ``directory``). Raises :class:`CheckpointError`; ``OSError`` when the
    storage cannot be read."""
    state_path = storage.join(directory, STATE_FILE)
    shown = storage.join(name or directory, STATE_FILE)
    if not storage.exists(state_path):
        raise CheckpointError(f"{name or directory}: no inflora-ray checkpoint there ({STATE_FILE} missing)")
    data = storage.read_bytes(state_path)
    expected = recorded_state_digest(directory)
    if expected is None:
        log_event(log, "checkpoint_unverified", level=logging.WARNING, path=shown,
                  message=f"no {STATE_DIGEST_KEY} in {META_FILE} (a checkpoint of an earlier version): not verified")
    elif (actual := hashlib.sha256(data).hexdigest()) != expected:
        raise CheckpointError(f"{shown}: SHA-256 {actual} differs from {expected} recorded in {META_FILE}; the "
                              "file was cut short or altered after it was written")
    return load_state_bytes(data, shown)


def upgrade_stored_config(data: dict) -> dict:
    """A config stored by an earlier version, in today's keys: the test-only ``debug`` section is gone and
    ``data.num_workers`` is ``data.loader_workers``."""
    data.pop("debug", None)
    section = data.get("data")
    if isinstance(section, dict) and "num_workers" in section:
        section.setdefault("loader_workers", section.pop("num_workers"))
    return data


@dataclass(frozen=True)
class RunDir:
    """The files of one run, under ``path``."""
    path: str

    @classmethod
    def of(cls, storage_path: str, name: str, what: str = "run name") -> "RunDir":
        """The run ``name`` under ``storage_path`` (made absolute); ``name`` is checked (:func:`check_name`)
        and must stay inside the storage path."""
        return cls(_inside(storage_path, name, what))

    def claim(self) -> None:
        """Create the run's folder for this run only; :class:`RunClaimed` if it exists or another run won."""
        claim_folder(self.path, "run")

    def release(self) -> None:
        """Give the folder back if nothing was written to it (:func:`release_folder`)."""
        release_folder(self.path)

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

    @property
    def fatal_marker(self) -> str:
        """Written by a worker that hit an error a restart cannot fix (:mod:`inflora_ray.distributed.errors`);
        while it exists, every worker of a restarted attempt returns at once."""
        return storage.join(self.path, ".fatal.json")

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
    def read_config(self) -> dict:
        """The config the run stored (``results/config.yaml``) as a dict, in today's keys; :class:`ConfigError`
        when the file is damaged."""
        try:
            data = yaml.safe_load(storage.read_bytes(self.config))
        except yaml.YAMLError as e:
            raise ConfigError(f"{self.config} is not valid YAML ({str(e)[:200]}); the run's stored config is "
                              "damaged") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.config}: expected a mapping of config sections; the run's stored config is "
                              "damaged")
        return upgrade_stored_config(data)

    def read_metrics(self) -> dict | None:
        """The content of ``results/metrics.json`` (written by :meth:`write_final_results`; JSON only, nothing
        is unpickled); None while the run has not ended; :class:`ConfigError` when it is not a JSON object."""
        if not storage.exists(self.metrics):
            return None
        try:
            data = storage.read_json(self.metrics)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"{self.metrics} is not valid JSON ({str(e)[:120]}); the run's results are damaged") \
                from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.metrics}: expected a JSON object, got {type(data).__name__}; the run's "
                              "results are damaged")
        return data

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

    def write_final_results(self, tasks: list[dict], summ: dict, status: str = "finished") -> None:
        """The accuracy matrix as Parquet (long format) and the metrics as JSON; ``status`` (finished,
        failed, interrupted) and ``incomplete`` say whether every task ran."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if tasks:
            rows: dict[str, list] = {"after_task": [], "on_task": [], "accuracy": [], "correct": [], "total": [],
                                     "own_head_accuracy": []}
            for t in tasks:
                r = t["report"]
                for j, (c, n, own) in enumerate(zip(r["correct"], r["total"], r["own_head_correct"])):
                    for key, value in (("after_task", r["task"]), ("on_task", j), ("accuracy", c / n),
                                       ("correct", c), ("total", n), ("own_head_accuracy", own / n)):
                        rows[key].append(value)
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table(rows), sink)
            storage.write_bytes(self.accuracy_matrix, sink.getvalue().to_pybytes())
        per_task = [{k: v for k, v in t["report"].items() if k not in ("correct", "total", "own_head_correct")}
                    for t in tasks]
        storage.write_json(self.metrics, {**summ, "tasks": per_task, "complete": len(tasks), "status": status,
                                          "incomplete": status != "finished"})


@dataclass(frozen=True)
class SweepDir:
    """The files of one sweep, under ``path``."""
    path: str

    @classmethod
    def of(cls, storage_path: str, name: str) -> "SweepDir":
        """The sweep ``name`` under ``storage_path`` (checked like a run name)."""
        return cls(_inside(storage_path, name, "sweep name"))

    def claim(self) -> None:
        """Create the sweep's folder for this sweep only (:func:`claim_folder`)."""
        claim_folder(self.path, "sweep")

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
    def outcomes(self) -> str:
        """How each trial ended (completed, pruned, error), written by the sweep's driver."""
        return storage.join(self.path, "trial_outcomes.json")

    @property
    def table_files(self) -> tuple[str, str]:
        """The trial table as CSV and as Parquet."""
        return storage.join(self.path, "trials.csv"), storage.join(self.path, "trials.parquet")
