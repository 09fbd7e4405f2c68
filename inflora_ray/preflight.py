"""The checks a run and a sweep make on the driver before any compute, in one place: the config against the
model and the data, the storage, a ``--start-from`` checkpoint, the tracking server, the Ray cluster. Each
failure raises :class:`PreflightError` with a message that says what to fix.

The order is the same for both: :func:`check_config` (cheap, no Ray started), :func:`checked_benchmark` (the
dataset listed once), :func:`start_tracker` (the tracking server asked), :func:`join_cluster` (Ray started or
joined, and asked whether it can ever place the workers)."""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
from typing import Optional, Sequence
from urllib.parse import urlparse

from . import storage
from .config import Config
from .logs import is_verbose, log_event
from .redact import redact_uri

log = logging.getLogger(__name__)


class PreflightError(RuntimeError):
    """Something that would make the run fail, found before any compute; the message says what to fix."""


def in_submitted_job() -> bool:
    """True inside a ``ray job submit`` entrypoint."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_model(cfg: Config) -> int:
    """Build the architecture on the meta device (no weights, no memory) to check it and the rank against the
    adapted layers' width; returns that width."""
    from .core.lora import check_rank
    from .core.methods import METHODS
    from .core.model import check_builtin_weights, meta_backbone

    try:
        model = meta_backbone(cfg.model)
        if cfg.model.weights_file is not None and cfg.model.weights_file.startswith("builtin:"):
            check_builtin_weights(cfg.model)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    dim = int(getattr(model, "embed_dim", 0))
    if METHODS[cfg.method.name].uses_adapters:
        try:
            check_rank(cfg.method.rank, dim)
        except ValueError as e:
            raise PreflightError(f"{e} ({cfg.model.name})") from None
    return dim


def check_data(cfg: Config) -> None:
    """The data settings against the benchmark (which options apply; the dataset is where they say)."""
    from .config import ConfigError
    from .data.registry import check_data_config

    try:
        check_data_config(cfg.data)
    except ConfigError as e:
        raise PreflightError(str(e)) from None


def check_settings(cfg: Config) -> None:
    """The checks of a config that need neither Ray, nor storage, nor training: the model builds with the
    method's rank (and shipped weights match), the data settings fit the benchmark (``--print-config`` runs
    these)."""
    check_model(cfg)
    check_data(cfg)


def check_ray_version() -> None:
    """The installed Ray still has the functions the runs' process group and trainer call outside its public
    API (:func:`~inflora_ray.ray_train.process_group.check_ray_api`); else a :class:`PreflightError` naming the
    Ray found, the one supported and what to do."""
    from .ray_train.process_group import RayVersionError, check_ray_api

    try:
        check_ray_api()
    except RayVersionError as e:
        raise PreflightError(str(e)) from None


def check_config(cfg: Config, address: Optional[str] = None) -> str:
    """What every run and sweep checks first, before anything is read or started: the working directory and
    HOME can be written (:func:`check_environment`), no setting is a stored config's redacted value
    (:func:`check_credentials`), the installed Ray fits (:func:`check_ray_version`), the Ray address answers
    (when one is given), :func:`check_settings`, the storage path is writable. Returns the storage path,
    absolute."""
    check_environment(cfg)
    check_credentials(cfg)
    check_ray_version()
    check_ray_address(address)
    check_settings(cfg)
    return check_storage(cfg)


# ------------------------------------------------------------------------------------------- credentials
# How each setting whose credentials a stored config lost is given again.
_GIVE_AGAIN = {"run.storage_path": "--storage-path URI (or run.storage_path=URI)", "data.shards": "data.shards=URI",
               "data.root": "data.root=PATH"}


def check_credentials(cfg: Config) -> None:
    """Have every message and log line of this process redact the credentials of ``cfg``'s URIs
    (:func:`~inflora_ray.redact.remember_secrets`), and refuse a storage or data setting that is the redacted
    value of a stored config (``s3://KEY:***@bucket/...``: a ``--resume`` or ``--start-from`` without it given
    again), which would be used as a path named ``***`` or refused by the store. tracking.uri is checked by
    the tracker (MLFLOW_TRACKING_URI may stand in for it)."""
    from .redact import remember_secrets
    from .tracking.store import credential_values, redacted_settings

    remember_secrets(*credential_values(cfg).values())
    lost = redacted_settings(cfg, keys=tuple(_GIVE_AGAIN))
    if lost:
        listed = "; ".join(f"{k}={v!r}: give it again with {_GIVE_AGAIN[k]}" for k, v in lost.items())
        raise PreflightError(f"{listed} (the stored config of a run holds its URIs with the credentials replaced by "
                             "***: inflora-ray never stores them)")


# ------------------------------------------------------------------------------------------- environment
def working_directory() -> str:
    """The working directory; a :class:`PreflightError` saying what to do when it was deleted (or moved)."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        raise PreflightError(DELETED_CWD) from None


DELETED_CWD = ("the working directory no longer exists (it was deleted or moved away): cd to an existing, writable "
               "directory and run the command again")


def _unwritable(folder: str) -> Optional[str]:
    """Why no file can be created in ``folder`` (None when one can: a probe file is created and removed)."""
    if not os.path.exists(folder):
        return "does not exist"
    if not os.path.isdir(folder):
        return "is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".inflora-write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"is not writable ({type(e).__name__}: {e.strerror or e})"
    return None


def _sqlite_folder(uri: str) -> Optional[str]:
    """The folder of a local sqlite MLflow store (``sqlite:///file``: MLflow's default, ``mlflow.db`` in the
    working directory), where the database and its journal are written; None for any other store."""
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return os.path.dirname(os.path.abspath(uri[len("sqlite:///"):].split("?", 1)[0]))
    return None


def check_environment(cfg: Optional[Config] = None) -> None:
    """Before anything starts: the working directory exists and, when ``cfg`` writes there (a relative
    run.storage_path such as the default ``runs``, MLflow's default store ``mlflow.db`` + ``mlruns/``), can be
    written; a local MLflow store's folder can be written (else the store retries for about two minutes);
    HOME is a writable directory (Ray keeps its auth token in ``~/.ray``, MLflow and matplotlib their settings
    and caches under ``~/.config`` and ``~/.cache``, torch and timm downloaded weights in ``~/.cache``). Each
    problem is a :class:`PreflightError` naming the directory and the setting or variable to change."""
    cwd = working_directory()
    home = os.path.expanduser("~")
    why = _unwritable(home) if home != "~" else "is not set"
    if why is not None:
        raise PreflightError(f"HOME={os.environ.get('HOME', home)!r} {why}: Ray (~/.ray), MLflow (~/.config/mlflow), "
                             "matplotlib and the model downloads (~/.cache) write there; set HOME to an existing "
                             "writable directory (e.g. export HOME=/tmp/$USER after mkdir -p /tmp/$USER) and run again")
    if cfg is None:
        return
    here = []  # what this config writes into the working directory
    path = cfg.run.storage_path
    if not storage.is_uri(path) and not os.path.isabs(os.path.expanduser(path)):
        here.append(f"run.storage_path={path!r} (relative: give --storage-path an absolute path or a URI)")
    store = None
    if cfg.tracking.enabled:
        from .tracking.store import resolve_uri

        uri = resolve_uri(cfg)
        store = _sqlite_folder(uri)
        default = not cfg.tracking.uri and "MLFLOW_TRACKING_URI" not in os.environ
        if store == cwd:
            here.append(f"MLflow's {'default ' if default else ''}store {redact_uri(uri)} (set --tracking-uri / "
                        "MLFLOW_TRACKING_URI to a writable place or a server, or run with tracking.enabled=false)")
    why = _unwritable(cwd) if here else None
    if why is not None:
        raise PreflightError(f"the working directory {cwd} {why}, and the run would write there: {'; '.join(here)}; "
                             "or cd to a writable directory and run again")
    why = _unwritable(store) if store is not None and store != cwd else None
    if why is not None:
        raise PreflightError(f"the folder {store} of the MLflow store {redact_uri(uri)} {why}: create it, or set "
                             "--tracking-uri / MLFLOW_TRACKING_URI to a writable place or a server, or run with "
                             "tracking.enabled=false")


def checked_benchmark(cfg: Config, scanned=None):
    """The run's :class:`~inflora_ray.data.Benchmark`: the dataset listed (and verified) now, or built from
    ``scanned``, a caller's scan of it; an unusable dataset is a :class:`PreflightError`."""
    from .data import build_benchmark

    try:
        return build_benchmark(cfg.data, cfg.model.img_size, model=cfg.model, scanned=scanned)
    except (OSError, ValueError) as e:
        raise PreflightError(f"data: {e}") from None


def join_cluster(cfg: Config, address: Optional[str]) -> None:
    """Start or join Ray (:func:`connect_ray`), check that it can ever place the config's workers, and warn
    about the config's local paths that every node must have (:func:`warn_shared_paths`)."""
    connect_ray(address)
    check_resources(cfg)
    warn_shared_paths(cfg)


def check_storage(cfg: Config) -> str:
    """The absolute storage path, after checking it is usable (writable; absolute under ``ray job submit``)."""
    path = cfg.run.storage_path
    if in_submitted_job() and not (storage.is_uri(path) or os.path.isabs(path)):
        raise PreflightError(f"run.storage_path={path!r} is relative: under `ray job submit` it would "
                             "land in the job's temporary copy of the working dir and be lost; give --storage-path "
                             "an absolute shared path (NFS) or an s3:// / gs:// URI")
    absolute = storage.absolute(path)
    storage.check_writable(absolute)
    return absolute


def start_tracker(cfg: Config):
    """The MLflow tracker of this config (None when tracking is off), after checking that its store answers:
    a redacted URI given back, the server's health check, the database driver, MLflow 3's refusal of file
    stores, the credentials, a look-up of the experiment. Any problem is a :class:`PreflightError` that says
    what to fix (credentials redacted), raised before any compute."""
    if not cfg.tracking.enabled:
        return None
    from .tracking import Tracker, TrackingUnavailable

    try:
        tracker = Tracker(cfg)
        tracker.probe()
    except TrackingUnavailable as e:
        raise PreflightError(str(e)) from None
    return tracker


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


def check_ray_address(address: Optional[str]) -> None:
    """Fail fast, before the dataset scan and the model check, when ``address`` (RAY_ADDRESS) names a cluster
    that cannot be reached; nothing without an address or once this process is connected."""
    import ray

    if address and not ray.is_initialized():
        _tcp_reachable(address)


_RAY_LOCK = threading.Lock()


def _submitted_job_env_vars() -> dict:
    """The variables a submitted job's own runtime env sets (``ray job submit --runtime-env-json``); {} when
    this process is not a job's entrypoint."""
    try:
        runtime_env = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("runtime_env") or {}
        return dict(runtime_env.get("env_vars") or {})
    except (KeyError, ValueError, AttributeError, TypeError):
        return {}


def job_runtime_env() -> dict | None:
    """The runtime env this driver gives its Ray job: the S3 endpoint settings it has
    (:func:`~inflora_ray.storage.forwarded_env`), so that every process the job starts on any node (Ray Train's
    controllers and workers, Ray Tune's trials and their runs) writes to the store this driver checked and Ray
    keeps the checkpoints in; less those a submitted job's own runtime env sets (Ray refuses a variable given
    twice). None when there is nothing to add."""
    given = _submitted_job_env_vars()
    env = {k: v for k, v in storage.forwarded_env().items() if k not in given}
    return {"env_vars": env} if env else None


def connect_ray(address: Optional[str]) -> None:
    """Use the running Ray, connect to ``address`` (RAY_ADDRESS), or start a local Ray (once per process), with
    :func:`job_runtime_env`. The workers' output reaches this console only with ``--verbose``
    (:func:`~inflora_ray.logs.is_verbose`); it is always in the run's log and in Ray's logs."""
    import ray

    verbose = is_verbose()
    quiet = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                 runtime_env=job_runtime_env())
    with _RAY_LOCK:
        if ray.is_initialized():
            return
        if not address:
            ray.init(**quiet)
            return
        _tcp_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except Exception as e:
            raise PreflightError(f"cannot connect to Ray at {address!r}: {e}") from None


_FETCH = object()


def _autoscaler_config():
    """The autoscaler's record of its node groups (Ray Train sizes its worker groups from it too), or None
    without an autoscaler."""
    try:
        from ray._private.state import state as ray_state

        return ray_state.get_cluster_config()
    except Exception:  # a Ray without this record
        return None


def node_shapes(autoscaler=_FETCH) -> list[dict[str, float]]:
    """The resources of each node the cluster has now, and of one node of each autoscaler node group that may
    have nodes (``autoscaler``: a record already fetched by :func:`_autoscaler_config`)."""
    import ray

    config = _autoscaler_config() if autoscaler is _FETCH else autoscaler
    groups = [] if config is None else [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")] + groups


def cluster_capacity(autoscaler=_FETCH) -> dict[str, float]:
    """The most of each resource the cluster can ever hold: what it has now, or, on an autoscaling cluster,
    what its node groups reach at their maximum size (whichever is more)."""
    import ray
    from ray._private.state import GlobalState

    config = _autoscaler_config() if autoscaler is _FETCH else autoscaler
    have = dict(ray.cluster_resources())
    keys = {k for g in config.node_group_configs for k in g.resources} if config is not None else set()
    for key in keys:
        ceiling = GlobalState._calculate_max_resource_from_cluster_config(config, key) or 0
        have[key] = max(float(have.get(key, 0)), float(ceiling))
    return have


def check_resources(cfg: Config) -> None:
    """Fail if the cluster can never place the workers, even scaled up (unless run.wait_for_resources)."""
    r = cfg.run
    need = {"CPU": r.num_workers * r.cpus_per_worker}
    if r.use_gpu:
        need["GPU"] = r.num_workers * r.gpus_per_worker
    autoscaler = _autoscaler_config()  # fetched once for both views
    have = cluster_capacity(autoscaler)
    fits_one = any(n.get("CPU", 0) >= r.cpus_per_worker and (not r.use_gpu or n.get("GPU", 0) >= r.gpus_per_worker)
                   for n in node_shapes(autoscaler))
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if (short or not fits_one) and not r.wait_for_resources:
        detail = ", ".join(f"{k}: needs {n:g}, cluster has {h:g}" for k, (n, h) in short.items()) or \
            "no single node can hold one worker"
        raise PreflightError(
            f"the cluster can never place {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU"
            f"{f', {r.gpus_per_worker:g} GPU' if r.use_gpu else ''}) ({detail}); lower run.num_workers / "
            "run.cpus_per_worker, or set run.wait_for_resources=true on an autoscaling cluster")


def _is_local(path: str) -> bool:
    return not storage.is_uri(path) or path.startswith("file://")


def shared_paths(cfg: Config, start_from: str | None = None) -> dict[str, str]:
    """The local paths of ``cfg`` (and ``--start-from``) that processes on other nodes open, by setting: the
    storage path (the workers write the run's folder, a sweep's trials their runs' folders), the dataset (the
    shards when given, else ``data.root``), a weights file (each worker builds the model), the checkpoint a
    run starts from (the workers load it)."""
    found = {"run.storage_path": cfg.run.storage_path,
             "data.shards" if cfg.data.shards else "data.root": cfg.data.shards or cfg.data.root,
             "--start-from": start_from}
    weights = cfg.model.weights_file
    if weights and not weights.startswith("builtin:"):
        found["model.weights_file"] = storage.absolute(weights)
    return {k: v for k, v in found.items() if v and _is_local(v)}


def spans_nodes() -> bool:
    """Whether the cluster has more than one node, or an autoscaler that may add nodes."""
    import ray

    config = _autoscaler_config()
    if config is not None and any(g.max_count != 0 for g in config.node_group_configs):
        return True
    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1


_WARNED: set = set()  # (setting, path) already warned about by this process


def warn_shared_paths(cfg: Config, start_from: str | None = None) -> None:
    """On a cluster of several nodes (:func:`spans_nodes`), a ``shared_path_warning`` for each local path
    (:func:`shared_paths`): this driver cannot see whether the other nodes have it, and a worker that does not
    would fail mid-run. Once per setting and path in a process; nothing inside a Ray actor (a sweep's trial:
    its sweep's driver warned)."""
    import ray

    if ray.get_runtime_context().get_actor_id() is not None:
        return
    paths = {k: v for k, v in shared_paths(cfg, start_from).items() if (k, v) not in _WARNED}
    if not paths or not spans_nodes():
        return
    remedy = {"run.storage_path": "an s3:// or gs:// URI",
              "data.root": "data.shards with an s3:// or gs:// URI (python -m inflora_ray.data prepare)",
              "data.shards": "an s3:// or gs:// URI", "model.weights_file": "the cluster's image",
              "--start-from": "the checkpoint's s3:// or gs:// URI"}
    for setting, path in paths.items():
        _WARNED.add((setting, path))
        log_event(log, "shared_path_warning", level=logging.WARNING, setting=setting, path=path,
                  message=f"{setting}={path} is a local path on a cluster of several nodes: it must exist at "
                          f"this path on every node (a shared file system such as NFS), or use "
                          f"{remedy[setting]}")


def warn_local_paths(cfg: Config, tracker, start_from: str | None = None) -> None:
    """Warn about places that only this machine sees when the run spans several: ``--start-from``
    (``start_from``; the config's own paths are warned about by :func:`join_cluster`) and MLflow's local
    default store inside a submitted job."""
    if start_from is not None:
        warn_shared_paths(cfg, start_from)
    if in_submitted_job() and tracker is not None and tracker.uri.startswith(("sqlite:", "file:")) \
            and not cfg.tracking.uri and "MLFLOW_TRACKING_URI" not in os.environ:
        log_event(log, "tracking_warning", level=logging.WARNING, uri=tracker.uri,
                  message="MLflow's local default store inside a submitted job lives in the job's temporary "
                          "working dir; set MLFLOW_TRACKING_URI (runtime env) or --tracking-uri")


def read_start_checkpoint(path: str) -> dict:
    """The learner state of the ``--start-from`` checkpoint at ``path``, an absolute path or a URI (the workers
    open it, not this shell): ``state.pt`` is there, intact (the SHA-256 that ``meta.json`` records) and holds
    only tensors and plain containers. Raises :class:`PreflightError` naming the checkpoint."""
    what = f"--start-from {path!r}"
    if not storage.is_uri(path) and not os.path.isabs(path):
        raise PreflightError(f"{what}: give an absolute path or a URI (the workers open it, not this shell), "
                             f"e.g. {os.path.abspath(path)!r}")
    from .training.checkpoint import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(path)
    except CheckpointError as e:  # the message names the checkpoint
        raise PreflightError(f"--start-from: {e}") from None
    except OSError as e:
        raise PreflightError(f"{what}: cannot read the checkpoint ({type(e).__name__}: {e})") from None


def check_start_checkpoint(path: str, cfg: Config, class_order: Optional[Sequence[int]] = None,
                           state: Optional[dict] = None) -> dict:
    """``--start-from path``: the checkpoint is readable and intact (:func:`read_start_checkpoint`, unless its
    ``state`` was read already), has a supported version, and fits ``cfg``: the method, the adapted layers'
    count, rank and width, the task heads against the config's tasks, and the class order (``class_order``,
    the built benchmark's, when given; else what ``cfg.data`` resolves to, see
    :func:`~inflora_ray.training.checkpoint.config_architecture`). Raises :class:`PreflightError` naming the
    checkpoint; returns its learner state (its ``config`` and ``next_task`` say what a branch continues)."""
    from .training.checkpoint import checkpoint_problems, config_architecture

    state = read_start_checkpoint(path) if state is None else state
    try:
        arch = config_architecture(cfg, class_order)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    problems = checkpoint_problems(state, arch)
    if problems:
        raise PreflightError(f"--start-from {path!r} does not fit the config: {'; '.join(problems)}")
    return state
