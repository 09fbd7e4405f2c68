"""A benchmark's samples as released, read through its registry entry (no Parquet shards involved)."""
from __future__ import annotations

from typing import Optional

from .base import DataError
from .registry import get_benchmark, shardable_benchmarks


def load_raw_sources(benchmark: str, source: str, download: bool = False, manifest: Optional[str] = None,
                     verify_hashes: bool = False, verify_release: bool = True) -> tuple:
    """(train, test, class names, provenance) of the release of ``benchmark`` in the folder ``source``.

    ``download`` applies to downloadable benchmarks only, ``manifest`` / ``verify_hashes`` to those with a split
    manifest, ``verify_release`` to those with official file checksums; other benchmarks ignore them.
    """
    spec = get_benchmark(benchmark)
    if spec.in_memory:
        raise DataError(f"benchmark {benchmark!r} is built in memory and has no release folder; "
                        f"choose one of {shardable_benchmarks()}")
    options: dict = {}
    if spec.downloadable:
        options["download"] = download
    if spec.split_manifest:
        options.update(manifest=manifest, verify_hashes=verify_hashes)
    if spec.release_checksums:
        options["verify_release"] = verify_release
    return spec.source_loader()(source, **options)


def load_in_memory_sources(benchmark: str, img_size: int) -> tuple:
    """(train, test, class names, provenance) of an in-memory benchmark, images at ``img_size`` px."""
    spec = get_benchmark(benchmark)
    if not spec.in_memory:
        raise DataError(f"benchmark {benchmark!r} is read from its release folder, not built in memory")
    return spec.source_loader()(img_size)
