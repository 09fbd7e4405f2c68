"""The benchmarks: one entry per name (:data:`inflora_ray.config.BENCHMARK_NAMES`), read by the loaders, the
shard tools, the transforms and the data CLI, and the checks of a data config that depend on the benchmark.

Importing this module is cheap (no torch, no dataset code); a spec imports its release module only when asked
to load samples.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

from ..config import ConfigError, DataConfig

# The paper's training crop (RandomResizedCrop's usual range) for every real benchmark.
PAPER_TRAIN_SCALE = (0.08, 1.0)
PAPER_TRAIN_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the rest of the package needs to know about one benchmark."""
    name: str
    num_classes: int
    default_num_tasks: int
    # The module of inflora_ray.data that reads the release, and its function returning
    # (train, test, class names, provenance); imported only when samples are loaded.
    module: str
    loader: str
    in_memory: bool = False  # built in memory (no data.root, no shards); the loader takes img_size
    downloadable: bool = False  # data.download can fetch the release into data.root (loader option download)
    # Has a versioned train/test split manifest (data.manifest; loader options manifest, verify_hashes; the
    # module's build_split_manifest writes one).
    split_manifest: bool = False
    # The release's files have official checksums, checked before they are read unless data.verify_release is
    # false (loader option verify_release).
    release_checksums: bool = False
    # Training crop: area fraction, aspect-ratio range, horizontal flip.
    train_scale: tuple[float, float] = PAPER_TRAIN_SCALE
    train_ratio: tuple[float, float] = PAPER_TRAIN_RATIO
    train_flip: bool = True
    # Test-time resize as a fraction of img_size before the centre crop (None: resize straight to img_size).
    test_resize_ratio: Optional[float] = None
    description: str = ""

    @property
    def shardable(self) -> bool:
        """Can be converted to Parquet shards (``inflora-data prepare``)."""
        return not self.in_memory

    def release_module(self) -> ModuleType:
        """The module that reads this benchmark's release (imported now)."""
        return importlib.import_module(f"{__package__}.{self.module}")

    def source_loader(self) -> Callable[..., tuple]:
        """The function returning (train, test, class names, provenance) of the release."""
        return getattr(self.release_module(), self.loader)


BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    # Digits are centred, upright glyphs: mild crops, no flips (a flipped 2 is not a 2).
    BenchmarkSpec("digits", num_classes=10, default_num_tasks=5, module="digits", loader="load_digits_sources",
                  in_memory=True, train_scale=(0.7, 1.0), train_ratio=(0.9, 1.1), train_flip=False,
                  description="scikit-learn's bundled handwritten digits (the offline quickstart)"),
    BenchmarkSpec("cifar100", num_classes=100, default_num_tasks=10, module="cifar100",
                  loader="load_cifar100_sources", downloadable=True, release_checksums=True,
                  description="CIFAR-100, the python release"),
    BenchmarkSpec("imagenet-r", num_classes=200, default_num_tasks=10, module="imagenet_r",
                  loader="load_imagenet_r_sources", split_manifest=True, test_resize_ratio=256 / 224,
                  description="ImageNet-R, 80/20 split per class"),
    BenchmarkSpec("domainnet", num_classes=345, default_num_tasks=5, module="domainnet",
                  loader="load_domainnet_sources", test_resize_ratio=256 / 224,
                  description="DomainNet, the six domains with their official train/test lists"),
)}


def benchmark_names() -> list[str]:
    """Every benchmark name, in registry order."""
    return list(BENCHMARKS)


def shardable_benchmarks() -> list[str]:
    """Benchmarks that ``inflora-data prepare`` can convert to Parquet shards."""
    return [name for name, spec in BENCHMARKS.items() if spec.shardable]


def split_manifest_benchmarks() -> list[str]:
    """Benchmarks with a versioned split manifest (``inflora-data manifest``)."""
    return [name for name, spec in BENCHMARKS.items() if spec.split_manifest]


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec of ``name``; a ``ValueError`` lists the valid names."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"data.benchmark={name!r} is not available; available: {benchmark_names()}") from None


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"data.{key}: {message}")


def _named(flag: str) -> str:
    """The benchmarks whose spec has ``flag`` set, for a message: ``'cifar100'``, ``'a', 'b'``."""
    return ", ".join(repr(s.name) for s in BENCHMARKS.values() if getattr(s, flag))


def check_data_config(data: DataConfig) -> None:
    """The checks of a data config that depend on its benchmark: which options apply to it, and that its dataset
    is where the config says (``data.shards`` or ``data.root``). Raises :class:`ConfigError` naming the key and
    what to write instead; run before any compute by :func:`inflora_ray.presets.load_config` and again when
    a run builds its benchmark."""
    spec = get_benchmark(data.benchmark)
    _require(not data.download or spec.downloadable, "download",
             f"only {_named('downloadable')} can be downloaded; the others must be on disk")
    _require(data.manifest is None or spec.split_manifest, "manifest",
             f"a split manifest only applies to benchmark {_named('split_manifest')}")
    _require(data.verify_release or spec.release_checksums, "verify_release",
             f"false only applies to benchmark {_named('release_checksums')} (the others have no official "
             "checksums); remove the setting")
    if data.shards is not None:
        _require(not spec.in_memory, "shards", f"the {data.benchmark} quickstart is built in memory; shards apply "
                 f"to {', '.join(s.name for s in BENCHMARKS.values() if not s.in_memory)}")
        _require("://" in data.shards or Path(data.shards).expanduser().is_dir(), "shards",
                 f"path not found: {data.shards!r}; prepare shards with `python -m inflora_ray.data prepare "
                 "BENCHMARK --source PATH --out URI`")
    elif not spec.in_memory:
        _require(data.root is not None, "root", f"benchmark {data.benchmark!r} needs data.root (the dataset's "
                 f"folder), e.g. data.root=/data/{data.benchmark}, or data.shards (prepared Parquet shards)")
        _require(Path(data.root).exists() or data.download, "root", f"path not found: {data.root!r}")
