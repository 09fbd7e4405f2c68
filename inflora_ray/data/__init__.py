"""Benchmarks, task splits and per-worker sharded loaders."""
from __future__ import annotations

from ..config import DataConfig
from .base import Benchmark, ImageSource, TensorSource, resolve_class_order, split_tasks
from .transforms import Preprocess


def build_benchmark(cfg: DataConfig, img_size: int) -> Benchmark:
    """Load the configured benchmark and split it into tasks by the configured class order."""
    if cfg.benchmark == "digits":
        from .digits import load_digits_sources

        train, test, names, manifest = load_digits_sources(img_size)
        # Digits are centred, upright glyphs: mild crops, no flips (a flipped 2 is not a 2).
        preprocess = Preprocess(img_size=img_size, train_scale=(0.7, 1.0), train_ratio=(0.9, 1.1),
                                train_flip=False)
    else:
        raise ValueError(f"data.benchmark={cfg.benchmark!r} is not available yet; available: ['digits']")
    order = resolve_class_order(len(names), cfg.class_order, cfg.class_order_seed)
    tasks = split_tasks(order, cfg.num_tasks)
    return Benchmark(name=cfg.benchmark, train=train, test=test, class_names=names, preprocess=preprocess,
                     class_order=order, tasks=tasks, manifest=manifest)


__all__ = ["Benchmark", "ImageSource", "TensorSource", "Preprocess", "build_benchmark",
           "resolve_class_order", "split_tasks"]
