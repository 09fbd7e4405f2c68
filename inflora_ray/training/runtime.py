"""Process-level setup of a worker: device, seeding, RNG state for checkpoints, peak memory."""
from __future__ import annotations

import random
import resource
from typing import Optional

import numpy as np
import torch


def resolve_device(cfg_train, device: Optional[torch.device] = None) -> torch.device:
    """The explicit device, else the configured one ("auto": CUDA when available)."""
    if device is not None:
        return torch.device(device)
    if cfg_train.device == "cuda" or (cfg_train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident set size of this process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Process RNG states as tensors and plain types (loadable with ``torch.load(weights_only=True)``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_gauss": (int(has_gauss), float(cached)), "python": random.getstate()}


def set_rng_state(rng: dict) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), rng["numpy_pos"],
                         rng["numpy_gauss"][0], rng["numpy_gauss"][1]))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
