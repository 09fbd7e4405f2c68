"""The Ray Train trainer every run is launched with: Ray's ``TorchTrainer`` without two costs a run does not
need, each paid at every run start and again at every restart of its worker group.

- **No Ray Data actor.** Ray Train starts a ``DatasetManager`` actor with every worker group, whether or not
  the run has Ray Datasets. Runs here read their data through their own loaders and never pass
  ``datasets=``, so that actor only costs a process that imports Ray Data (about 3 s of CPU on the
  controller's node each time). The trainer leaves Ray Train's dataset callback out when no dataset is given.
- **No torch in the controller.** The process group is configured by
  :class:`~.process_group.ProcessGroupConfig` (the same process group, set up by Ray's own functions on the
  workers), so Ray Train's controller does not import torch to unpickle Ray's ``TorchConfig``: about 260 MiB
  less memory of its own per controller (``bench/controller.py``, docs/performance.md).

The workers also get the driver's S3 endpoint settings (:func:`~inflora_ray.storage.forwarded_env`) in their
runtime env, so that they write to the store Ray keeps the run's checkpoints in, whatever their node's
environment says.

Measured on 2 cores (a 1-worker run of a function that imports the worker's code, 3 runs each): 16-21 s from
``fit()`` to the end with Ray's ``TorchTrainer``, 14-18 s with this one (docs/testing.md).

The hooks used, ``_create_default_callbacks`` and the backend hooks, are Ray Train V2's (Ray 2.60, the version
``pyproject.toml`` holds Ray to); ``tests/test_ray_train.py`` fails if a run starts a ``DatasetManager`` again
or its controller imports torch.
"""
from __future__ import annotations

from dataclasses import replace

from ray.train import RunConfig
from ray.train.torch import TorchTrainer

from .. import storage
from .process_group import ProcessGroupConfig

try:
    from ray.train.v2._internal.callbacks import DatasetsCallback
except ImportError:  # another Ray Train: leave its callbacks as they are
    DatasetsCallback = None


class RunTrainer(TorchTrainer):
    """``ray.train.torch.TorchTrainer`` whose controller needs no torch (``torch_config`` defaults to a
    :class:`ProcessGroupConfig`), that starts no Ray Data actor for a run without Ray Datasets, and whose
    workers see this process's S3 endpoint settings (unless ``run_config.worker_runtime_env`` sets them)."""

    def __init__(self, *args, torch_config=None, run_config=None, **kwargs):
        super().__init__(*args, torch_config=torch_config or ProcessGroupConfig(),
                         run_config=with_forwarded_env(run_config), **kwargs)

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if DatasetsCallback is None or self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


def with_forwarded_env(run_config=None):
    """``run_config`` (None: Ray's default) whose ``worker_runtime_env`` also sets this process's S3 endpoint
    settings (:func:`~inflora_ray.storage.forwarded_env`); the variables it sets itself are kept."""
    env = storage.forwarded_env()
    if not env:
        return run_config
    run_config = run_config or RunConfig()
    runtime_env = dict(run_config.worker_runtime_env or {})
    runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
    return replace(run_config, worker_runtime_env=runtime_env)
