"""Checks made on the driver before any compute: the model, the storage, the tracking server, the cluster.
Each failure raises :class:`PreflightError` with a message that says what to fix."""
from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence
from urllib.parse import urlparse

from .. import storage
from ..config import Config
from ..logs import log_event
from ..rundir import CheckpointError, read_checkpoint

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class PreflightError(RuntimeError):
    """Something that would make the run fail, found before any compute; the message says what to fix."""


def in_submitted_job() -> bool:
    """True inside a ``ray job submit`` entrypoint."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _meta_backbone(cfg: Config) -> torch.nn.Module:
    """The configured timm model built on the meta device (no weights, no memory)."""
    import timm
    import torch

    kwargs = dict(num_classes=0, img_size=cfg.model.img_size, **cfg.model.kwargs)
    try:
        with torch.device("meta"):
            return timm.create_model(cfg.model.name, pretrained=False, **kwargs)
    except Exception as e:
        raise PreflightError(f"model: cannot build {cfg.model.name!r} with kwargs {cfg.model.kwargs}: {e}") from None


def check_model(cfg: Config) -> int:
    """Build the architecture on the meta device (no weights, no memory) to check it and the rank against the
    adapted layers' width; returns that width."""
    from ..core.lora import check_rank

    model = _meta_backbone(cfg)
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
    """The MLflow tracker of this config (None when tracking is off), after checking that its store answers:
    a redacted URI given back, the server's health check, the database driver, MLflow 3's refusal of file
    stores, the credentials, a look-up of the experiment. Any problem is a :class:`PreflightError` that says
    what to fix (credentials redacted), raised before any compute."""
    if not cfg.tracking.enabled:
        return None
    from ..tracking import Tracker, TrackingUnavailable

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


# ------------------------------------------------------------------------------------------------------------
# The checkpoint to start from (--start-from), also checked by every worker before it loads one
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """What a learner state must match to load into a learner: the method, its adapted layers, the task
    heads and the class order."""
    method: str
    layers: int  # adapted layers (0: the method has no adapters)
    rank: Optional[int]  # adapter rank (None: no adapters)
    width: int  # input width of the adapted layers and of the heads (the ViT's embed_dim)
    task_sizes: list[int]  # number of classes of each task, in task order
    class_order: list[int]


def config_architecture(cfg: Config, class_order: Optional[Sequence[int]] = None) -> Architecture:
    """The architecture ``cfg`` builds (the model on the meta device, no weights). The class order is
    ``class_order`` (the built benchmark's) when given, else the one ``cfg.data`` resolves to for the
    benchmark's registered number of classes (no data is read)."""
    from ..core.methods import METHODS
    from ..data.base import resolve_class_order, split_tasks
    from ..data.registry import get_benchmark

    model = _meta_backbone(cfg)
    adapted = METHODS[cfg.method.name].uses_adapters
    try:
        if class_order is None:
            class_order = resolve_class_order(get_benchmark(cfg.data.benchmark).num_classes, cfg.data.class_order,
                                              cfg.data.class_order_seed)
        tasks = split_tasks(class_order, cfg.data.num_tasks)
    except ValueError as e:
        raise PreflightError(f"data: {e}") from None
    return Architecture(method=cfg.method.name, layers=len(model.blocks) if adapted else 0,
                        rank=cfg.method.rank if adapted else None, width=int(model.embed_dim),
                        task_sizes=[len(t) for t in tasks], class_order=[int(c) for c in class_order])


_STATE_KEYS = ("version", "method", "heads", "class_order", "next_task")


def checkpoint_problems(state: dict, arch: Architecture) -> list[str]:
    """Why the learner state ``state`` cannot load into a learner of ``arch`` (empty when it fits)."""
    from ..training.learner import CHECKPOINT_VERSION

    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        return [f"not an inflora-ray learner state (no {', '.join(missing)})"]
    if state["version"] != CHECKPOINT_VERSION:
        return [f"checkpoint version {state['version']!r} is not supported (this version reads "
                f"{CHECKPOINT_VERSION})"]
    method = state["method"].get("name") if isinstance(state["method"], dict) else None
    if method != arch.method:
        return [f"it was made by method {method!r}, the config says method.name={arch.method!r}"]
    return [*_adapter_problems(state, arch), *_head_problems(state, arch), *_order_problems(state, arch)]


def _shape(x) -> Optional[tuple]:
    """The shape of a tensor, None for anything else."""
    import torch

    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _adapter_sets(state: dict) -> list[tuple[str, list]]:
    """(what, per-layer adapter tensors) of every finished task, and of the task in progress if any."""
    history = state["method"].get("history") or []
    sets = [(f"task {t}", layers) for t, layers in enumerate(history)]
    in_task = state.get("in_task")
    if isinstance(in_task, dict) and in_task.get("adapters") is not None:
        sets.append(("the task in progress", in_task["adapters"]))
    return sets


def _adapter_problems(state: dict, arch: Architecture) -> list[str]:
    """The adapters' layer count, rank and width against the config's."""
    want = {"lora_A": (arch.rank, arch.width), "lora_B_k": (arch.width, arch.rank),
            "lora_B_v": (arch.width, arch.rank)}
    for what, layers in _adapter_sets(state):
        if not isinstance(layers, list) or len(layers) != arch.layers:
            count = len(layers) if isinstance(layers, list) else type(layers).__name__
            return [f"the adapters of {what} cover {count} layers, the config's model has {arch.layers} "
                    "adapted layers"]
        for i, layer in enumerate(layers):
            shapes = {k: _shape(v) for k, v in layer.items()} if isinstance(layer, dict) else {}
            if shapes != want:
                rank, width = shapes.get("lora_A") or (None, None)
                return [f"the adapter of {what}, layer {i} has rank {rank} and input width {width} "
                        f"({shapes}), the config has method.rank={arch.rank} and a model of width {arch.width}"]
    return []


def _head_problems(state: dict, arch: Architecture) -> list[str]:
    """The number of task heads and their shapes against the config's tasks and width."""
    heads, num_tasks = state["heads"], len(arch.task_sizes)
    if not isinstance(heads, list) or len(heads) > num_tasks:
        count = len(heads) if isinstance(heads, list) else type(heads).__name__
        return [f"it has {count} task heads, the config has data.num_tasks={num_tasks}"]
    problems = []
    next_task = state["next_task"]
    if not isinstance(next_task, int) or not 0 <= next_task <= num_tasks:
        problems.append(f"its next task {next_task!r} is not in 0..{num_tasks} (data.num_tasks={num_tasks})")
    for t, (head, size) in enumerate(zip(heads, arch.task_sizes)):
        shape = _shape(head.get("weight")) if isinstance(head, dict) else None
        if shape != (size, arch.width):
            problems.append(f"the head of task {t} has shape {shape}, the config's task {t} has {size} classes "
                            f"and a model of width {arch.width} (data.num_tasks, model.kwargs)")
            break
    return problems


def _brief(order: Sequence) -> str:
    """A class order for a message: at most its first 12 entries."""
    head = ", ".join(str(c) for c in list(order)[:12])
    return f"[{head}{', ...' if len(order) > 12 else ''}] ({len(order)} classes)"


def _order_problems(state: dict, arch: Architecture) -> list[str]:
    """The checkpoint's class order against the config's."""
    order = state["class_order"]
    if not isinstance(order, (list, tuple)) or [c for c in order if not isinstance(c, int)]:
        return [f"its class order is not a list of class indices ({type(order).__name__})"]
    if list(order) != arch.class_order:
        return [f"its class order {_brief(order)} differs from the config's {_brief(arch.class_order)} "
                "(data.benchmark, data.class_order, data.class_order_seed)"]
    return []


def check_start_checkpoint(path: str, cfg: Config, class_order: Optional[Sequence[int]] = None) -> Optional[dict]:
    """``--start-from path``: an absolute path or URI; ``state.pt`` is there, intact (its SHA-256 when
    ``meta.json`` records one), holds only tensors and plain containers, has a supported version, and fits
    ``cfg``: the method, the adapted layers' count, rank and width, the task heads against the config's tasks,
    and the class order (``class_order``, the built benchmark's, when given; else what ``cfg.data`` resolves
    to, see :func:`config_architecture`). Raises :class:`PreflightError` naming the checkpoint; returns the
    config saved in the checkpoint (None if it holds none), for the comparison of settings."""
    what = f"--start-from {path!r}"
    if not storage.is_uri(path) and not os.path.isabs(path):
        raise PreflightError(f"{what}: give an absolute path or a URI (the workers open it, not this shell), "
                             f"e.g. {os.path.abspath(path)!r}")
    try:
        state = read_checkpoint(path)
    except CheckpointError as e:  # the message names the checkpoint
        raise PreflightError(f"--start-from: {e}") from None
    except OSError as e:
        raise PreflightError(f"{what}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    problems = checkpoint_problems(state, config_architecture(cfg, class_order))
    if problems:
        raise PreflightError(f"{what} does not fit the config: {'; '.join(problems)}")
    saved = state.get("config")
    return saved if isinstance(saved, dict) else None
