"""The torch.distributed setup of a run's Ray Train workers, without torch in Ray Train's controller.

Ray's ``TorchConfig`` lives in a module that imports torch, and Ray Train's controller (a process of its own,
started for every run and again by each trial of a sweep) unpickles the trainer's backend config: so every
run start paid a torch import (about 2.4 s of CPU) in a process that never touches a tensor. The config below
is defined in this torch-free module and only refers to torch from functions that run on the workers, where
they call Ray's own process-group functions (``ray.train.torch.config``: the distributed environment
variables, NCCL's error handling, the shutdown), so a run's workers (CPU or GPU; TPUs are not supported) get
the process group ``TorchTrainer`` gives them.

Ray 2.60's Train V2 calls these hooks (``pyproject.toml`` holds Ray to 2.60.x); ``tests/test_ray_train.py``
checks that the controller of a run has no torch and that the workers' process group is set up. What is
used of Ray beyond its public API is listed in :data:`RAY_PRIVATE_API`; every run and sweep checks it on the
driver before anything starts (:func:`check_ray_api`), so a Ray whose functions changed is refused at once
with what to do, instead of failing once the workers are up. Measured on 2 cores (``bench/controller.py``,
docs/performance.md): a controller with Ray's ``TorchConfig`` holds about 260 MiB more memory of its own,
about 16 GiB on the head node of a sweep of 64 trials.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import ray
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig

log = logging.getLogger(__name__)

# The Ray minor release whose private functions this module and ``trainer.py`` were written against.
SUPPORTED_RAY = "2.60"


@dataclass(frozen=True)
class Call:
    """How the project calls one of Ray's functions: ``args`` positional arguments (``self`` included for a
    method) and the keyword arguments ``kwargs``."""

    args: int = 0
    kwargs: tuple[str, ...] = ()


# What this module, ``trainer.py`` and ``stopping.py`` use of Ray beyond its public API, by module: attribute (dotted for a
# class's attribute) -> how it is called, or None where only its presence matters.
RAY_PRIVATE_API: dict[str, dict[str, Call | None]] = {
    "ray.train.torch.config": {
        "_set_torch_distributed_env_vars": Call(),
        "_setup_torch_process_group": Call(kwargs=("backend", "world_rank", "world_size", "init_method",
                                                   "timeout_s")),
        "_shutdown_torch": Call(kwargs=("destroy_process_group",)),
        "TorchConfigContextManager": Call(),
        "TorchConfigContextManager.__enter__": Call(args=1),
        "TorchConfigContextManager.__exit__": Call(args=4),
    },
    "ray.train._internal.utils": {"get_address_and_port": Call()},
    "ray._private.ray_constants": {"env_integer": Call(args=2)},
    "ray.train.constants": {"TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": None,
                            "DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": None},
    "ray.train.v2._internal.util": {"TrainingFramework.TORCH": None},
    "ray.train.v2._internal.execution.worker_group.execution_group": {
        "ExecutionGroup.execute_single": Call(args=3),
        "ExecutionGroup.execute_single_async": Call(args=3, kwargs=("backend", "world_rank", "world_size",
                                                                    "master_addr", "master_port", "timeout_s")),
        "ExecutionGroup.execute_async": Call(args=2, kwargs=("destroy",)),
        "ExecutionGroup.__len__": Call(args=1),
    },
    "ray.train.v2._internal.execution.worker_group.worker_group": {
        "WorkerGroup.get_resources_per_worker": Call(args=1)},
    "ray.train.v2._internal.callbacks": {"DatasetsCallback": None},
    # stopping.py: a worker-group callback in the controller that aborts the job as Ctrl-C does
    "ray.train.v2._internal.execution.callback": {
        "WorkerGroupCallback.after_worker_group_poll_status": Call(args=2)},
    "ray.train.v2._internal.execution.controller.controller": {"TrainController.abort": Call(args=1)},
    "ray.train.v2.api.data_parallel_trainer": {"DataParallelTrainer._create_default_callbacks": Call(args=1)},
}


def _problem(module, name: str, call: Call | None) -> str | None:
    """What is wrong with ``module.name`` for ``call`` (None: nothing)."""
    target = module
    for part in name.split("."):
        if not hasattr(target, part):
            return f"{module.__name__}.{name} is missing"
        target = getattr(target, part)
    if call is None:
        return None
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return f"{module.__name__}.{name} is no longer a function"
    try:
        signature.bind(*range(call.args), **dict.fromkeys(call.kwargs))
    except TypeError as e:
        return f"{module.__name__}.{name}{signature} no longer takes the project's call ({e})"
    return None


def ray_api_problems(api: dict | None = None,
                     import_module: Callable[[str], object] = importlib.import_module) -> list[str]:
    """What no longer fits in the installed Ray of what :data:`RAY_PRIVATE_API` (or ``api``) lists: a module,
    an attribute that is gone, a function whose signature no longer takes the project's call."""
    problems = []
    for module_name, names in (RAY_PRIVATE_API if api is None else api).items():
        try:
            module = import_module(module_name)
        except ImportError as e:
            problems.append(f"module {module_name} cannot be imported ({e})")
            continue
        problems += [p for name, call in names.items() if (p := _problem(module, name, call)) is not None]
    return problems


class RayVersionError(RuntimeError):
    """The installed Ray lacks (or changed) a function the project's process group or trainer calls."""


def check_ray_api(api: dict | None = None,
                  import_module: Callable[[str], object] = importlib.import_module) -> None:
    """Raise :class:`RayVersionError` naming the Ray found, the one supported and what to do when any of
    :data:`RAY_PRIVATE_API` (or ``api``) no longer fits (:func:`ray_api_problems`); run on the driver before
    anything starts, so a changed Ray fails there and not once the workers are up."""
    problems = ray_api_problems(api, import_module)
    if problems:
        raise RayVersionError(
            f"Ray {ray.__version__} is installed, but inflora-ray supports Ray {SUPPORTED_RAY}.x: it sets up the "
            f"workers' process group through Ray Train functions outside Ray's public API, and in this Ray "
            f"{'; '.join(problems)}. Install the supported Ray (pip install 'ray[default,train,tune]=="
            f"{SUPPORTED_RAY}.*', which `pip install -e .` does), or port "
            "inflora_ray/ray_train/process_group.py to this Ray.")


try:
    from ray.train.v2._internal.util import TrainingFramework
except ImportError:  # not Train V2: the attribute is only read by its state tracking
    TrainingFramework = None


@dataclass
class ProcessGroupConfig(BackendConfig):
    """What ``ray.train.torch.TorchConfig`` configures (``env://`` initialisation): ``backend`` (None: NCCL
    when the workers have GPUs, else gloo) and the process group's ``timeout_s``."""

    backend: Optional[str] = None
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return CurrentDevice

    @property
    def framework(self):
        return TrainingFramework.TORCH if TrainingFramework is not None else None

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class CurrentDevice:
    """Around the training function on each worker: Ray's own context of TorchTrainer (it makes the worker's
    GPU the current CUDA device), entered from the worker where torch is imported anyway."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


def choose_backend(config: ProcessGroupConfig, resources_per_worker: dict) -> str:
    """The process group's backend: the configured one, else NCCL for GPU workers and gloo otherwise."""
    if config.backend:
        return config.backend
    return "nccl" if resources_per_worker.get("GPU", 0) > 0 else "gloo"


def _join_process_group(backend: str, world_rank: int, world_size: int, master_addr: str, master_port: int,
                        timeout_s: int) -> None:
    """On one worker: the ``env://`` variables and torch.distributed's process group, by Ray's functions."""
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    _set_torch_distributed_env_vars()
    _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size, init_method="env://",
                               timeout_s=timeout_s)


def _leave_process_group(destroy: bool) -> None:
    """On one worker: destroy the process group (with more than one worker) and free cached GPU memory."""
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)


class ProcessGroupBackend(Backend):
    """Ray Train's hooks for :class:`ProcessGroupConfig`; they run in the controller and send work to the
    workers as functions of this module."""

    share_cuda_visible_devices: bool = True  # as TorchTrainer: each worker sees its node's GPUs, picks its own

    def on_start(self, worker_group, backend_config: ProcessGroupConfig):
        from ray.train._internal.utils import get_address_and_port

        backend = choose_backend(backend_config, worker_group.get_resources_per_worker())
        master_addr, master_port = worker_group.execute_single(0, get_address_and_port)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _join_process_group, backend=backend, world_rank=i, world_size=n,
                                                   master_addr=master_addr, master_port=master_port,
                                                   timeout_s=backend_config.timeout_s) for i in range(n)])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig):
        from ray._private import ray_constants
        from ray.train.constants import (DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                         TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)

        futures = worker_group.execute_async(_leave_process_group, destroy=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            log.warning("torch process group shutdown timed out after %s s", timeout_s)
