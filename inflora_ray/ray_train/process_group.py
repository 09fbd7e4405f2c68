"""The torch.distributed setup of a run's Ray Train workers, without torch in Ray Train's controller.

Ray's ``TorchConfig`` lives in a module that imports torch, and Ray Train's controller (a process of its own,
started for every run and again by each trial of a sweep) unpickles the trainer's backend config: so every
run start paid a torch import (about 3 s of CPU) in a process that never touches a tensor. The config below
is defined in this torch-free module and only refers to torch from functions that run on the workers, where
they call Ray's own process-group functions (``ray.train.torch.config``: the distributed environment
variables, NCCL's error handling, the shutdown), so a run's workers (CPU or GPU; TPUs are not supported) get
the process group ``TorchTrainer`` gives them.

Ray 2.60's Train V2 calls these hooks (``pyproject.toml`` holds Ray to 2.60.x); ``tests/test_ray_train.py``
checks that the controller of a run has no torch and that the workers' process group is set up.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import ray
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig

log = logging.getLogger(__name__)

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
