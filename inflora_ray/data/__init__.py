"""Benchmarks, task splits and per-worker sharded loaders."""
from __future__ import annotations

from typing import Any, Optional

from ..config import DataConfig
from .base import (Benchmark, DataError, FileSource, ImageSource, TensorSource, resolve_class_order,
                   split_tasks)
from .transforms import Preprocess, paper_preprocess, resolve_normalization


def _model_name(model: Any) -> Optional[str]:
    if model is None or isinstance(model, str):
        return model
    return getattr(model, "name", None)


def build_benchmark(cfg: DataConfig, img_size: int, model: Any = None) -> Benchmark:
    """Load the configured benchmark and split it into tasks by the configured class order.

    Reads the raw dataset under ``cfg.root``, or the prepared Parquet shards at ``cfg.shards`` when set.
    ``model`` (a ModelConfig or a timm model name) is only needed for ``cfg.normalize == "backbone"``.
    """
    normalize = getattr(cfg, "normalize", "none")
    shards = getattr(cfg, "shards", None)
    if cfg.benchmark == "digits":
        if shards:
            raise DataError("data.shards is not supported for the digits quickstart (it is built in memory)")
        from .digits import load_digits_sources

        train, test, names, manifest = load_digits_sources(img_size)
        mean, std = resolve_normalization(normalize, _model_name(model))
        # Digits are centred, upright glyphs: mild crops, no flips (a flipped 2 is not a 2).
        preprocess = Preprocess(img_size=img_size, train_scale=(0.7, 1.0), train_ratio=(0.9, 1.1),
                                train_flip=False, mean=mean, std=std)
    elif cfg.benchmark in ("cifar100", "imagenet-r", "domainnet"):
        if shards:
            from .shards import load_shards

            cache_mb = getattr(cfg, "shard_cache_mb", 1024)
            train, test, names, manifest = load_shards(shards, cfg.benchmark, cache_bytes=cache_mb << 20)
        else:
            if cfg.root is None:
                raise DataError(f"benchmark {cfg.benchmark!r} needs data.root (the dataset's folder) or "
                                "data.shards (prepared Parquet shards)")
            from .shards import load_raw_sources

            train, test, names, manifest = load_raw_sources(
                cfg.benchmark, cfg.root, download=getattr(cfg, "download", False),
                manifest=getattr(cfg, "manifest", None), verify_hashes=getattr(cfg, "verify_hashes", False))
        mean, std = resolve_normalization(normalize, _model_name(model))
        preprocess = paper_preprocess(cfg.benchmark, img_size, mean, std)
    else:
        raise ValueError(f"data.benchmark={cfg.benchmark!r} is not available; available: "
                         "['digits', 'cifar100', 'imagenet-r', 'domainnet']")
    manifest = dict(manifest, normalize=normalize, preprocess={
        "img_size": preprocess.img_size, "train_scale": list(preprocess.train_scale),
        "train_flip": preprocess.train_flip, "test_resize": preprocess.test_resize,
        "mean": preprocess.mean, "std": preprocess.std})
    order = resolve_class_order(len(names), cfg.class_order, cfg.class_order_seed)
    tasks = split_tasks(order, cfg.num_tasks)
    return Benchmark(name=cfg.benchmark, train=train, test=test, class_names=names, preprocess=preprocess,
                     class_order=order, tasks=tasks, manifest=manifest)


__all__ = ["Benchmark", "DataError", "FileSource", "ImageSource", "TensorSource", "Preprocess", "build_benchmark",
           "paper_preprocess", "resolve_class_order", "resolve_normalization", "split_tasks"]
