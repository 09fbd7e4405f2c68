"""The benchmarks: one entry per name, read by the config, the loaders, the shard tools and the transforms.

Importing this module is cheap (no torch, no dataset code); a spec's functions import their source lazily.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the rest of the package needs to know about one benchmark."""
    name: str
    num_classes: int
    default_num_tasks: int
    in_memory: bool = False  # built in memory (no data.root, no shards)
    downloadable: bool = False  # data.download can fetch the release into data.root
    split_manifest: bool = False  # has a versioned train/test split manifest (data.manifest)
    # Test-time resize as a fraction of img_size before the centre crop (None: resize straight to img_size).
    test_resize_ratio: Optional[float] = None
    description: str = ""

    @property
    def shardable(self) -> bool:
        """Can be converted to Parquet shards (``inflora-data prepare``)."""
        return not self.in_memory


BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec("digits", num_classes=10, default_num_tasks=5, in_memory=True,
                  description="scikit-learn's bundled handwritten digits (the offline quickstart)"),
    BenchmarkSpec("cifar100", num_classes=100, default_num_tasks=10, downloadable=True,
                  description="CIFAR-100, the python release"),
    BenchmarkSpec("imagenet-r", num_classes=200, default_num_tasks=10, split_manifest=True,
                  test_resize_ratio=256 / 224, description="ImageNet-R, 80/20 split per class"),
    BenchmarkSpec("domainnet", num_classes=345, default_num_tasks=5, test_resize_ratio=256 / 224,
                  description="DomainNet, the six domains with their official train/test lists"),
)}


def benchmark_names() -> list[str]:
    """Every benchmark name, in registry order."""
    return list(BENCHMARKS)


def shardable_benchmarks() -> list[str]:
    """Benchmarks that ``inflora-data prepare`` can convert to Parquet shards."""
    return [name for name, spec in BENCHMARKS.items() if spec.shardable]


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec of ``name``; a ``ValueError`` lists the valid names."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"data.benchmark={name!r} is not available; available: {benchmark_names()}") from None
