"""Search-space files (``tune_spaces/*.yaml``): which config fields a sweep searches, and how.

Each parameter is one config field (``section.key``) with one distribution: ``choice``, ``grid``, ``uniform``,
``loguniform`` or ``randint`` (inclusive bounds). Every listed value, and both bounds of every range, must make
a valid config; this is checked before any trial starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml

from ..config import Config, ConfigError
from .preflight import PreflightError, check_model

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
DEFAULT_METRIC = "average_incremental_accuracy"
METRICS = ("average_incremental_accuracy", "pooled_accuracy", "forgetting", "backward_transfer", "train_loss")


class SpaceError(ValueError):
    """An invalid search-space file; the message names the parameter and what to fix."""


@dataclass
class Param:
    """One searched config field: ``key`` (e.g. ``method.rank``), distribution and its arguments."""
    key: str
    kind: str
    values: list


@dataclass
class SearchSpace:
    """The parameters of a sweep and the metric (and mode) that ranks its trials."""
    params: list[Param]
    metric: str = DEFAULT_METRIC
    mode: str = "max"
    description: str = ""

    def as_dict(self) -> dict:
        """``{key: {distribution: values}}``, as in the file (recorded with the sweep)."""
        return {p.key: {p.kind: p.values} for p in self.params}

    def to_tune(self) -> dict:
        """The Ray Tune param_space (flat keys)."""
        from ray import tune

        out = {}
        for p in self.params:
            if p.kind == "choice":
                out[p.key] = tune.choice(p.values)
            elif p.kind == "grid":
                out[p.key] = tune.grid_search(p.values)
            elif p.kind == "uniform":
                out[p.key] = tune.uniform(*p.values)
            elif p.kind == "loguniform":
                out[p.key] = tune.loguniform(*p.values)
            elif p.kind == "randint":
                out[p.key] = tune.randint(p.values[0], p.values[1] + 1)  # inclusive upper bound in the file
        return out


def valid_param_keys() -> list[str]:
    """Every config field a space may search (flattened ``section.key``; not where or how runs are placed)."""
    return sorted(k for k in Config().flat() if not k.startswith(("run.", "tracking.")))


def load_space(path: str, base: Config) -> SearchSpace:
    """Read and validate a search-space YAML against the base config; raises :class:`SpaceError`."""
    try:
        data = yaml.safe_load(open(path))
    except FileNotFoundError:
        raise SpaceError(f"--space: file not found: {path!r}") from None
    except yaml.YAMLError as e:
        raise SpaceError(f"--space {path!r}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not data["params"]:
        raise SpaceError(f"{path}: expected a mapping with a non-empty 'params:' section")
    unknown_top = sorted(set(data) - {"params", "metric", "mode", "description"})
    if unknown_top:
        raise SpaceError(f"{path}: unknown top-level key(s) {unknown_top}; valid: params, metric, mode, description")
    metric, mode = data.get("metric", DEFAULT_METRIC), data.get("mode", "max")
    if metric not in METRICS:
        raise SpaceError(f"{path}: metric {metric!r} is not reported per task; choose one of {list(METRICS)}")
    if mode not in ("max", "min"):
        raise SpaceError(f"{path}: mode must be 'max' or 'min', got {mode!r}")
    valid = valid_param_keys()
    params = []
    for key, spec in data["params"].items():
        if key not in valid:
            raise SpaceError(f"{path}: unknown parameter {key!r}; valid parameters are {valid}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SpaceError(f"{path}: {key}: expected one of {{choice: [...]}}, {{grid: [...]}}, "
                             f"{{uniform: [low, high]}}, {{loguniform: [low, high]}}, {{randint: [low, high]}}; "
                             f"got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{path}: {key}: {kind} needs a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise SpaceError(f"{path}: {key}: {kind} needs [low, high] numbers, got {values!r}")
            low, high = values
            if low > high:
                raise SpaceError(f"{path}: {key}: low {low} > high {high}")
            if kind == "loguniform" and low <= 0:
                raise SpaceError(f"{path}: {key}: loguniform needs low > 0, got {low}")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise SpaceError(f"{path}: {key}: randint needs integer bounds, got {values!r}")
        params.append(Param(key, kind, list(values)))
    space = SearchSpace(params, metric, mode, str(data.get("description", "")))
    _check_values_against_config(space, base, path)
    return space


def _extremes(p: Param) -> list:
    return p.values if p.kind in ("choice", "grid") else [p.values[0], p.values[1]]


def _check_values_against_config(space: SearchSpace, base: Config, path: str) -> None:
    """Every listed value (and both bounds of ranges) must make a valid config, before any trial starts."""
    for p in space.params:
        for v in _extremes(p):
            try:
                cfg = base.with_values({p.key: v})
                check_model(cfg)
            except (ConfigError, PreflightError) as e:
                raise SpaceError(f"{path}: {p.key}={v!r} gives an invalid config: {e}") from None
