"""The benchmarks: one entry per name, read by the config, the loaders, the shard tools, the transforms and the
data CLI.

Importing this module is cheap (no torch, no dataset code); a spec imports its release module only when asked
to load samples.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

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
