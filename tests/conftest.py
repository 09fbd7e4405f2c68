"""Shared fixtures: tiny configs (seconds on 2 CPU cores); Ray and MLflow fixtures live in their own tests."""
from __future__ import annotations

import os

import pytest
import torch

# Keep the two cores for the test process (and Ray workers where used).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_MODEL = {"name": "vit_tiny_patch16_224", "img_size": 16,
              "kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}}


def tiny_overrides(**extra) -> list[str]:
    """Overrides that shrink the quickstart to a few seconds: 16 px, 2 blocks of width 48, 1 epoch."""
    o = {
        "model.img_size": 16, "model.kwargs": "{patch_size: 4, depth: 2, embed_dim: 48, num_heads: 3}",
        "model.weights_file": "null", "model.pretrained": "false",
        "train.epochs": 1, "data.batch_size": 64, "method.rank": 4, "train.device": "cpu",
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture
def tiny_cfg():
    from inflora_ray.config import load_config
    return load_config("quickstart", tiny_overrides())


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs: Ray Train workers take 1 CPU each)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()
