"""Checks made on the driver before any compute: the model, the storage, the tracking server, the cluster.
Each failure raises :class:`PreflightError` with a message that says what to fix."""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Optional
from urllib.parse import urlparse

import torch

from .. import storage
from ..config import Config
from ..logs import log_event

log = logging.getLogger(__name__)


class PreflightError(RuntimeError):
    """Something that would make the run fail, found before any compute; the message says what to fix."""


def in_submitted_job() -> bool:
    """True inside a ``ray job submit`` entrypoint."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_model(cfg: Config) -> int:
    """Build the architecture on the meta device (no weights, no memory) to check it and the rank against the
    adapted layers' width; returns that width."""
    import timm

    from ..core.lora import check_rank

    kwargs = dict(num_classes=0, img_size=cfg.model.img_size, **cfg.model.kwargs)
    try:
        with torch.device("meta"):
            model = timm.create_model(cfg.model.name, pretrained=False, **kwargs)
    except Exception as e:
        raise PreflightError(f"model: cannot build {cfg.model.name!r} with kwargs {cfg.model.kwargs}: {e}") from None
    if cfg.model.weights_file is not None and cfg.model.weights_file.startswith("builtin:"):
        from ..core.model import check_builtin_weights
        try:
            check_builtin_weights(cfg.model)
        except ValueError as e:
            raise PreflightError(str(e)) from None
    dim = int(getattr(model, "embed_dim", 0))
    from ..core.methods import METHODS
    if METHODS[cfg.method.name].uses_adapters:
        try:
            check_rank(cfg.method.rank, dim)
        except ValueError as e:
            raise PreflightError(f"{e} ({cfg.model.name})") from None
    return dim


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
    """The MLflow tracker of this config (None when tracking is off), after a health check of its server."""
    if not cfg.tracking.enabled:
        return None
    from ..tracking import Tracker, TrackingUnavailable, check_server

    tracker = Tracker(cfg)
    try:
        check_server(tracker.uri)
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


_RAY_LOCK = threading.Lock()


def connect_ray(address: Optional[str]) -> None:
    """Use the running Ray, connect to ``address`` (RAY_ADDRESS), or start a local Ray (once per process)."""
    import ray

    with _RAY_LOCK:
        if ray.is_initialized():
            return
        if not address:
            ray.init(log_to_driver=True)
            return
        _tcp_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as e:
            raise PreflightError(f"cannot connect to Ray at {address!r}: {e}") from None


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


def warn_local_paths(cfg: Config, tracker) -> None:
    """Warn about places that only this machine sees when the run spans several."""
    import ray

    if not storage.is_uri(cfg.run.storage_path) and sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
        log_event(log, "storage_warning", level=logging.WARNING, storage_path=cfg.run.storage_path,
                  message="local storage path on a multi-node cluster: every node must see it at the same "
                          "path (NFS), else use an s3:// or gs:// URI")
    if in_submitted_job() and tracker is not None and tracker.uri.startswith(("sqlite:", "file:")) \
            and not cfg.tracking.uri and "MLFLOW_TRACKING_URI" not in os.environ:
        log_event(log, "tracking_warning", level=logging.WARNING, uri=tracker.uri,
                  message="MLflow's local default store inside a submitted job lives in the job's temporary "
                          "working dir; set MLFLOW_TRACKING_URI (runtime env) or --tracking-uri")
