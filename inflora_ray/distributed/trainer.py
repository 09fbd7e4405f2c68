"""The Ray Train trainer every run is launched with: ``TorchTrainer`` without the Ray Data plumbing it does not use.

Ray Train starts a ``DatasetManager`` actor with every worker group (at the start and at each restart after a
lost worker), whether or not the run has Ray Datasets. Runs here read their data through their own loaders
and never pass ``datasets=``, so that actor only costs a process that imports Ray Data (about 3 s of CPU on
the controller's node each time; a 1-worker run on 2 cores takes about 3 s less without it). The trainer
below leaves Ray Train's dataset callback out when no dataset is given, and is Ray's ``TorchTrainer``
otherwise.

The hook it overrides, ``_create_default_callbacks``, is Ray Train V2's (Ray 2.60, the version
``pyproject.toml`` holds Ray to); ``tests/test_ray_train.py`` fails if a run starts a ``DatasetManager`` again.
"""
from __future__ import annotations

from ray.train.torch import TorchTrainer

try:
    from ray.train.v2._internal.callbacks import DatasetsCallback
except ImportError:  # another Ray Train: leave its callbacks as they are
    DatasetsCallback = None


class RunTrainer(TorchTrainer):
    """``ray.train.torch.TorchTrainer`` that starts no Ray Data actor for a run without Ray Datasets."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if DatasetsCallback is None or self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
