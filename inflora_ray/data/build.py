"""A configured benchmark: its samples (in memory, from prepared shards or from the release), its
preprocessing, class order and task split.

Finding the samples (listing the folder, reading manifests, checking every file's size and, with
``data.verify_hashes``, its sha256) is done once per run, by the driver: :func:`scan_data` gives a
:class:`ScannedData` (file lists, labels, class names, the verification's provenance; no image bytes) that
the driver ships to its Ray Train workers and to a sweep's trials, and :func:`build_benchmark` turns it into
a :class:`Benchmark` without touching the dataset again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..config import DataConfig
from .base import Benchmark, DataError, resolve_class_order, split_tasks
from .holdout import split_off_validation
from .raw import load_in_memory_sources, load_raw_sources
from .registry import BenchmarkSpec, check_data_config, get_benchmark
from .transforms import paper_preprocess, resolve_normalization


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


# The data settings that decide which samples a scan finds (the others only split or transform them).
_SCAN_KEYS = ("benchmark", "root", "shards", "manifest", "verify_hashes", "verify_release", "download",
              "shard_cache_mb")


def scan_key(cfg: DataConfig, img_size: int) -> dict:
    """What a scan depends on: the data settings that locate and verify the samples (and the image size of a
    benchmark built in memory)."""
    key = {k: getattr(cfg, k) for k in _SCAN_KEYS}
    if get_benchmark(cfg.benchmark).in_memory:
        key["img_size"] = img_size
    return key


@dataclass
class ScannedData:
    """A benchmark's samples as found and verified once: the train and test sources (file lists, labels, shard
    manifests; picklable, no image bytes except a benchmark built in memory), class names, provenance, and
    the settings they were scanned with."""
    key: dict
    train: Any
    test: Any
    class_names: list[str]
    provenance: dict

    def fits(self, cfg: DataConfig, img_size: int) -> bool:
        """True if this scan is what ``cfg`` would find (same dataset, location and verification)."""
        return self.key == scan_key(cfg, img_size)


def scan_data(cfg: DataConfig, img_size: int) -> ScannedData:
    """Find and verify the configured benchmark's samples (lists the dataset; hashes it with verify_hashes) after
    checking the settings against the benchmark (:func:`~.registry.check_data_config`)."""
    check_data_config(cfg)
    spec = get_benchmark(cfg.benchmark)
    train, test, names, provenance = _load_sources(spec, cfg, img_size)
    return ScannedData(scan_key(cfg, img_size), train, test, list(names), provenance)


def build_benchmark(cfg: DataConfig, img_size: int, model: Any = None,
                    scanned: Optional[ScannedData] = None) -> Benchmark:
    """Load the configured benchmark and split it into tasks by the configured class order.

    Uses ``scanned`` (the run's one scan, from the driver) when it fits ``cfg``; otherwise scans: reads the raw
    dataset under ``cfg.root``, or the prepared Parquet shards at ``cfg.shards`` when set. ``model`` (a
    ModelConfig or a timm model name) is only needed for ``cfg.normalize == "backbone"``. With
    ``cfg.val_fraction``, the benchmark's ``test`` is the part of the training data held out
    (:mod:`.holdout`), and ``train`` the rest.
    """
    spec = get_benchmark(cfg.benchmark)
    if scanned is None or not scanned.fits(cfg, img_size):
        scanned = scan_data(cfg, img_size)
    train, test, names, manifest = scanned.train, scanned.test, scanned.class_names, scanned.provenance
    mean, std = resolve_normalization(cfg.normalize, _model_name(model))
    preprocess = paper_preprocess(spec.name, img_size, mean, std)
    manifest = dict(manifest, normalize=cfg.normalize, preprocess={
        "img_size": preprocess.img_size, "train_scale": list(preprocess.train_scale),
        "train_flip": preprocess.train_flip, "test_resize": preprocess.test_resize,
        "mean": preprocess.mean, "std": preprocess.std})
    if cfg.val_fraction:  # the run trains on the rest of the training data and is evaluated on this part
        train, test, held_out = split_off_validation(train, cfg.val_fraction, cfg.val_seed)
        manifest = dict(manifest, holdout=held_out)
    order = resolve_class_order(len(names), cfg.class_order, cfg.class_order_seed)
    tasks = split_tasks(order, cfg.num_tasks)
    return Benchmark(name=cfg.benchmark, train=train, test=test, class_names=names, preprocess=preprocess,
                     class_order=order, tasks=tasks, manifest=manifest, scanned=scanned, eval_split=cfg.eval_split)
