"""A configured benchmark: its samples (in memory, from prepared shards or from the release), its
preprocessing, class order and task split."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from .base import Benchmark, DataError, resolve_class_order, split_tasks
from .raw import load_in_memory_sources, load_raw_sources
from .registry import BenchmarkSpec, get_benchmark
from .transforms import paper_preprocess, resolve_normalization

if TYPE_CHECKING:
    from ..config import DataConfig


def _model_name(model: Any) -> Optional[str]:
    """The timm model name of ``model`` (a ModelConfig, a name, or None)."""
    if model is None or isinstance(model, str):
        return model
    return getattr(model, "name", None)


def _load_sources(spec: BenchmarkSpec, cfg: DataConfig, img_size: int) -> tuple:
    """(train, test, class names, provenance): built in memory, read from prepared shards, or from the release."""
    if spec.in_memory:
        if cfg.shards:
            raise DataError(f"data.shards is not supported for benchmark {spec.name!r} (it is built in memory)")
        return load_in_memory_sources(spec.name, img_size)
    if cfg.shards:
        from .shards import load_shards

        return load_shards(cfg.shards, spec.name, cache_bytes=cfg.shard_cache_mb << 20,
                           verify_hashes=cfg.verify_hashes)
    if cfg.root is None:
        raise DataError(f"benchmark {spec.name!r} needs data.root (the dataset's folder) or "
                        "data.shards (prepared Parquet shards)")
    return load_raw_sources(spec.name, cfg.root, download=cfg.download, manifest=cfg.manifest,
                            verify_hashes=cfg.verify_hashes, verify_release=cfg.verify_release)


def build_benchmark(cfg: DataConfig, img_size: int, model: Any = None) -> Benchmark:
    """Load the configured benchmark and split it into tasks by the configured class order.

    Reads the raw dataset under ``cfg.root``, or the prepared Parquet shards at ``cfg.shards`` when set.
    ``model`` (a ModelConfig or a timm model name) is only needed for ``cfg.normalize == "backbone"``.
    """
    spec = get_benchmark(cfg.benchmark)
    train, test, names, manifest = _load_sources(spec, cfg, img_size)
    mean, std = resolve_normalization(cfg.normalize, _model_name(model))
    preprocess = paper_preprocess(spec.name, img_size, mean, std)
    manifest = dict(manifest, normalize=cfg.normalize, preprocess={
        "img_size": preprocess.img_size, "train_scale": list(preprocess.train_scale),
        "train_flip": preprocess.train_flip, "test_resize": preprocess.test_resize,
        "mean": preprocess.mean, "std": preprocess.std})
    order = resolve_class_order(len(names), cfg.class_order, cfg.class_order_seed)
    tasks = split_tasks(order, cfg.num_tasks)
    return Benchmark(name=cfg.benchmark, train=train, test=test, class_names=names, preprocess=preprocess,
                     class_order=order, tasks=tasks, manifest=manifest)
