"""Session-wide test setup: the thread budget and one local Ray for the whole session.

Shared helpers (the tiny ViT, config overrides) live in ``helpers.py``; fixtures for MLflow servers and Ray
clusters live in the test modules that use them.

Fault injection: the Ray Train worker reads ``INFLORA_RAY_FAULT`` (forwarded by the driver, never part of the
config), e.g. ``task=1,epoch=1,step=1,rank=1,mode=exit``; see ``inflora_ray/distributed/faults.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

# Keep the two cores for the test process (and Ray workers where used).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs: Ray Train workers take 1 CPU each)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()
