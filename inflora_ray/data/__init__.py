"""Benchmarks, task splits and per-worker loaders.

Importing the package is cheap (no torch): the names below are imported from their modules on first use, so
``inflora_ray.data.registry`` can be read by the configuration without loading any dataset code.
"""
from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module of this package that defines it.
_EXPORTS = {
    "Benchmark": "base", "DataError": "base", "FileSource": "base", "ImageSource": "base", "TensorSource": "base",
    "resolve_class_order": "base", "split_tasks": "base", "build_benchmark": "build",
    "scan_data": "build", "ScannedData": "build",
    "Preprocess": "transforms", "paper_preprocess": "transforms", "resolve_normalization": "transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, including the public ones not imported yet."""
    return sorted(set(globals()) | set(_EXPORTS))
