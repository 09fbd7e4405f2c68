"""Search-space files (``tune_spaces/*.yaml``): which config fields a sweep searches, and how.

Each parameter is one config field (``section.key``) with one distribution: ``choice``, ``grid``, ``uniform``,
``loguniform`` or ``randint`` (inclusive bounds). Before any trial starts, :func:`load_space` checks each
distribution against the field's declared type, and that the listed values and the range bounds, taken together,
make valid configs (:func:`check_combinations`); each trial checks its own sample again (:func:`check_sample`).
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import Config, ConfigError
from ..config_errors import strip_optional, type_name
from ..yaml_io import MAX_CHARS, load_yaml
from ..preflight import PreflightError, check_model

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
DEFAULT_METRIC = "average_incremental_accuracy"
RANGES = ("uniform", "loguniform", "randint")
MAX_COMBINATIONS = 4096  # above this many, check_combinations checks every pair of parameters instead
# What a trial reports after every task (means over its seeds); the accuracies in both definitions: pooled
# over all seen tasks' test images, and the task-mean (the mean of each seen task's accuracy).
METRICS = ("average_incremental_accuracy", "pooled_accuracy", "average_incremental_accuracy_task_mean",
           "task_mean_accuracy", "forgetting", "backward_transfer", "train_loss")


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
    space = read_space(path)
    check_combinations(space, base, path)
    return space


def read_space(path: str) -> SearchSpace:
    """Read a search-space YAML and check each parameter on its own (keys, distributions, types); the checks
    against a config, which build models, are :func:`check_combinations`. Raises :class:`SpaceError`."""
    try:
        with open(path) as f:
            data = load_yaml(f.read(MAX_CHARS + 1))
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
        if key == "experiment.seed":
            raise SpaceError(f"{path}: experiment.seed cannot be searched: a sweep would pick the luckiest seed, "
                             "and its winner would not reproduce. Every trial runs the same seeds (paired "
                             "comparison); set them with experiment.seed in the config and --seeds-per-trial")
        if key in ("data.val_fraction", "data.val_seed"):
            raise SpaceError(f"{path}: {key} cannot be searched: it decides which images the trials are ranked "
                             "on, so trials that differ in it are not comparable; set it in the config")
        if key not in valid:
            raise SpaceError(f"{path}: unknown parameter {key!r}; valid parameters are {valid}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SpaceError(f"{path}: {key}: expected one of {{choice: [...]}}, {{grid: [...]}}, "
                             f"{{uniform: [low, high]}}, {{loguniform: [low, high]}}, {{randint: [low, high]}}; "
                             f"got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{path}: {key}: {kind} needs a non-empty list")
        if kind in RANGES:
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
        check_type(params[-1], path)
    return SearchSpace(params, metric, mode, str(data.get("description", "")))


def field_type(key: str) -> Any:
    """The type a config field ``section.key`` declares in its pydantic model, without ``| None`` and annotations
    (``int`` for ``method.rank``, ``float`` for ``train.lr``, a ``Literal`` for ``train.optimizer``)."""
    section, name = key.split(".", 1)
    return strip_optional(Config.model_fields[section].annotation.model_fields[name].annotation)


def check_type(p: Param, path: str) -> None:
    """The distribution must produce values of the field's type: an int field takes ``randint`` and integer
    choices (``uniform``/``loguniform`` sample floats, which an int field refuses); a float field takes every
    distribution (ints are valid floats); any other field (bool, str, one of names, list, mapping) only
    ``choice``/``grid``. Raises :class:`SpaceError` naming the parameter and what to write instead."""
    tp = field_type(p.key)
    if tp is int and p.kind in ("uniform", "loguniform"):
        raise SpaceError(f"{path}: {p.key} is an integer field but {p.kind} samples floats (every trial would fail); "
                         f"use randint: [low, high] or choice: [...]")
    if tp is int and p.kind in ("choice", "grid"):
        bad = [v for v in p.values if v is not None and (not isinstance(v, int) or isinstance(v, bool))]
        if bad:
            raise SpaceError(f"{path}: {p.key} is an integer field; {p.kind} value(s) {bad} are not integers")
    if tp not in (int, float) and p.kind in RANGES:
        raise SpaceError(f"{path}: {p.key} takes {type_name(tp)}: only choice: [...] or grid: [...] apply, "
                         f"not {p.kind}")


def _candidates(p: Param) -> list:
    """The values a parameter is checked at: every listed value, or both bounds of a range."""
    return p.values if p.kind in ("choice", "grid") else [p.values[0], p.values[1]]


def _combinations(params: list[Param]) -> Iterator[dict]:
    """Every combination of the parameters' candidates, or, if there are more than :data:`MAX_COMBINATIONS`,
    every combination of the candidates of each pair of parameters with the others at their first candidate."""
    cands = [_candidates(p) for p in params]
    width = len(params) if math.prod(map(len, cands)) <= MAX_COMBINATIONS else min(len(params), 2)
    first = {p.key: c[0] for p, c in zip(params, cands)}
    for group in itertools.combinations(range(len(params)), width):
        for values in itertools.product(*(cands[i] for i in group)):
            yield {**first, **{params[i].key: v for i, v in zip(group, values)}}


def _mentioned(values: dict, error: Exception) -> dict:
    """The ``{key: value}`` of ``values`` whose keys the error message names."""
    return {k: v for k, v in values.items() if re.search(rf"(?<![\w.]){re.escape(k)}\b", str(error))}


def _invalid(values: dict, error: Exception) -> str:
    """'k=v with k2=v2 give(s) an invalid config: error', naming the values the error mentions (all if none)."""
    named = _mentioned(values, error) or values
    verb = "gives" if len(named) == 1 else "give"
    return f"{' with '.join(f'{k}={v!r}' for k, v in named.items())} {verb} an invalid config: {error}"


def check_combinations(space: SearchSpace, base: Config, path: str) -> None:
    """The configs a sweep can sample must be valid: ``base`` with every combination of each parameter's listed
    values (choice/grid) and range bounds (the corners of the continuous ranges), checked as a config (fields,
    cross-field rules such as ``method.lamb <= method.lame``) and as a model (the rank against the layers' width).

    Corners are enough because the config's rules are bounds on one field and comparisons of two fields, each
    monotone in every field it reads: if a rule holds at every corner of a box, it holds inside it. A space with
    more than :data:`MAX_COMBINATIONS` combinations is checked on a bounded subset: every pair of parameters at
    every combination of their values, the others at their first value; this still covers every rule that reads
    at most two searched fields. Each trial validates its sampled config again (:func:`check_sample`).
    Raises :class:`SpaceError` naming the values that clash and the rule they break."""
    ranges = {p.key for p in space.params if p.kind in RANGES}
    built = set()  # check_model reads the model section and the method's name and rank: build each once
    for values in _combinations(space.params):
        try:
            cfg = base.with_values(values)
            key = (cfg.model.model_dump_json(), cfg.method.name, cfg.method.rank)
            if key not in built:
                check_model(cfg)
                built.add(key)
        except (ConfigError, PreflightError) as e:
            message, named = f"{path}: {_invalid(values, e)}", set(_mentioned(values, e))
            if len(named) > 1:
                message += ("; make the ranges not overlap in that direction" if named & ranges else
                            "; every combination of choice/grid values is sampled: change the values or split "
                            "the space into two files")
            raise SpaceError(message) from None


def check_sample(base: Config, params: dict) -> Config:
    """A trial's config: ``base`` with the sampled flat ``section.key`` values set. Raises :class:`SpaceError`
    naming the sampled values that break a rule (the load-time checks cover the corners; this covers the sample
    itself)."""
    try:
        return base.with_values(params)
    except ConfigError as e:
        raise SpaceError(f"sampled {_invalid(params, e)}") from None
