"""The layout of a run's directory and of a sweep's directory (every path of their files is made here), the
names of runs and sweeps, and the claim that gives a new run or sweep its folder.

A run directory (``<run.storage_path>/<run name>``, a local path or an ``s3://`` / ``gs://`` URI)::

    checkpoint_task<TTT>/                 Ray Train checkpoint after task TTT (inflora_ray.training.checkpoint)
    checkpoint_task<TTT>_epoch<EEE>/      mid-task checkpoint (run.checkpoint_every_epochs)
    run.log                               the run's log: every worker's events, one per line (logs/ on s3, gs)
    progress.json                         the epoch the task under way has reached (rank 0, after each epoch)
    .held-by.json                         the driver that runs or continues the run (pid, host, renewed)
    results/config.yaml                   the resolved config (what --resume reads)
    results/config_history.json           settings changed by --resume / --start-from, and from which task
    results/record.json                   the run's record: class order, tasks, dataset manifest, versions, code
    results/tracking.json                 MLflow run id and the tasks already logged
    results/task_<TTT>.json               task TTT's result and the metrics after it (rank 0)
    results/adapters_task_<TTT>.pt        task TTT's finished adapter (A, B_k, B_v per layer)
    results/metrics.json                  final metrics, per-task figures, how the run ended
    results/accuracy_matrix.parquet       the accuracy matrix in long format

What those files hold is written and read by :mod:`inflora_ray.results`. A sweep directory
(``<run.storage_path>/<sweep name>``) holds Ray Tune's own files, ``sweep.json`` (the sweep's record), the
trials' run directories under ``runs/``, ``best_config.yaml`` and ``trials.csv`` / ``trials.parquet``.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from . import storage
from .config import Config, ConfigError, check_name


_CHECKPOINT_PREFIX = "checkpoint_task"
_SEED = "-seed"  # <base>-seed<k>: the run of seed k among several


def run_name(base: str, seed: Optional[int] = None) -> str:
    """The name of a run: ``base`` itself, or ``<base>-seed<k>`` for seed ``k`` of several runs made from one
    base (``--seeds``, a sweep trial's seeds). :func:`split_run_name` reads it back."""
    return base if seed is None else f"{base}{_SEED}{seed}"


def split_run_name(name: str) -> tuple[str, Optional[int]]:
    """``(base, seed)`` of a name made by :func:`run_name` (seed None when it carries none)."""
    base, sep, seed = name.rpartition(_SEED)
    return (base, int(seed)) if sep and base and seed.isdigit() else (name, None)


def default_run_name(cfg: Config, with_seed: bool = True) -> str:
    """``<experiment>-<method>-<YYYYmmdd-HHMMSS>``, with ``-seed<k>`` (``experiment.seed``) unless the seed
    is added per run later (``with_seed=False``: the base of several seeds' runs)."""
    base = f"{cfg.experiment.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_name(base, cfg.experiment.seed if with_seed else None)


def default_sweep_name(cfg: Config) -> str:
    """``sweep-<experiment>-<YYYYmmdd-HHMMSS>``."""
    return f"sweep-{cfg.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"


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


def check_contained(path: str, what: str) -> None:
    """Refuse a local folder below which anything is a symbolic link, or neither a regular file nor a folder
    (a device, a pipe): writes there could land outside the folder, reads could block. Object stores have no
    links, so a URI passes. Raises :class:`ConfigError` naming the entry and what to do."""
    if storage.is_uri(path) or not os.path.isdir(path):
        return
    for folder, dirs, files in os.walk(path):  # os.walk never follows a link to a folder
        for name in sorted(dirs + files):
            entry = os.path.join(folder, name)
            mode = os.lstat(entry).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                kind = f"a symbolic link to {os.readlink(entry)!r}" if stat.S_ISLNK(mode) else "not a regular file"
                raise ConfigError(f"{what} {path!r}: {entry} is {kind}; a run's files are written and read only "
                                  "inside its folder: remove it (or restore the folder from a copy) and try again")


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists: atomically (``O_EXCL``) on a file system; on an object
    store, write it if it was not there when looked at. False when it existed."""
    if storage.is_uri(path):
        if storage.exists(path):
            return False
        storage.write_bytes(path, data)
        return True
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


# A run's hold not renewed for this long is taken over (its holder renews it about every 10 s).
HOLD_STALE_SECONDS = 120.0


def _holder(since: Optional[str] = None) -> dict:
    """This process as a hold's holder: pid, host, when it took the hold, when it last renewed it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": since or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "renewed": time.time()}


def _is_mine(holder: dict) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _read_holder(path: str) -> dict:
    """A hold's holder (:func:`_holder`; empty when it is gone or unreadable)."""
    try:
        data = json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _gone(holder: dict) -> bool:
    """True when the hold's process is known to have ended: it stopped renewing the hold, or it ran on this host
    and its pid is not alive (a hold that cannot be read counts as gone)."""
    if not holder:
        return True
    renewed = holder.get("renewed")
    if not isinstance(renewed, (int, float)) or time.time() - renewed > HOLD_STALE_SECONDS:
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


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
        for n in names:
            storage.delete(storage.join(path, n))
    else:
        os.rmdir(path)


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
    def hold_file(self) -> str:
        """Held by the one process that runs or continues the run (its driver)."""
        return storage.join(self.path, ".held-by.json")

    def hold(self, take_over: bool = False) -> None:
        """Hold the run for this process while it runs or continues it: another process is refused
        (:class:`RunClaimed`, naming the holder), so two drivers never write into one folder. The holder
        renews its hold (:meth:`renew_hold`); a hold not renewed for :data:`HOLD_STALE_SECONDS`, or left by
        a process of this host that is gone, is taken over, and so is any hold with ``take_over`` (a caller
        that knows the holder is gone: Ray Tune restarts a trial only once its process has died). Atomic on a
        file system; best effort on an object store."""
        for _ in range(2):
            if _create_exclusive(self.hold_file, json.dumps(_holder()).encode()):
                return
            holder = _read_holder(self.hold_file)
            if not take_over and not _gone(holder):
                raise RunClaimed(f"run {self.name!r} is being run by process {holder.get('pid')} on "
                                 f"{holder.get('host')} (since {holder.get('since')}); wait for it to end, or, if "
                                 f"that process is gone, remove {self.hold_file} (it is taken over by itself "
                                 f"{HOLD_STALE_SECONDS:.0f} s after its holder stops renewing it)")
            try:
                storage.delete(self.hold_file)  # its process is gone: take the run over
            except OSError:  # another process took it over first: the next look says so
                pass
        raise RunClaimed(f"run {self.name!r}: another process took {self.hold_file} at the same time")

    def renew_hold(self) -> None:
        """Say that this process still holds the run (its driver does every few seconds)."""
        holder = _read_holder(self.hold_file)
        if _is_mine(holder):
            storage.write_bytes(self.hold_file, json.dumps(_holder(since=holder.get("since"))).encode())

    def release_hold(self) -> None:
        """Give up :meth:`hold` (if this process holds the run)."""
        if _is_mine(_read_holder(self.hold_file)):
            try:
                storage.delete(self.hold_file)
            except OSError:  # the store is not answering: the hold goes stale and is taken over
                pass

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
    def config_history(self) -> str:
        return self.result("config_history.json")

    @property
    def record(self) -> str:
        return self.result("record.json")

    @property
    def logs_per_process(self) -> bool:
        """True on an object store, which cannot append: each process writes its own log object there."""
        return storage.is_uri(self.path)

    @property
    def log_location(self) -> str:
        """The run's log: the file ``run.log`` on a file system (every process of the run appends to it), or the
        folder ``logs/`` on an object store (:attr:`logs_per_process`), shown with a trailing ``/``."""
        return storage.join(self.path, "logs") + "/" if self.logs_per_process else storage.join(self.path, "run.log")

    def log_path(self, process: str) -> str:
        """Where the process ``process`` (``rank0-<pid>``, ...) writes its events (see :attr:`log_location`)."""
        return storage.join(self.path, "logs", f"{process}.log") if self.logs_per_process else self.log_location

    @property
    def progress(self) -> str:
        """Where the task under way stands (rank 0 rewrites it after each epoch; the driver prints from it)."""
        return storage.join(self.path, "progress.json")

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
        """Written by a worker that hit an error a restart cannot fix (:mod:`inflora_ray.ray_train.errors`);
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
