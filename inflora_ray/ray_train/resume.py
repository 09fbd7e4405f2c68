"""Continuing a run (``--resume``) or branching from a checkpoint (``--start-from``): the stored config a
continuation starts from (the run's ``results/config.yaml``, or the config saved in the checkpoint), with
the command's overrides on top, and what a continuation may change. A change that alters results is
refused, unless the user allows it; then it is recorded in the run folder (``results/config_history.json``)
and on the MLflow run."""
from __future__ import annotations

import copy
import json
import time
from typing import Any

from .. import storage
from ..config import Config, ConfigError, RunSection, alters_results, config_from_dict, flatten, set_dotted
from ..data.registry import check_data_config
from ..preflight import PreflightError, read_start_checkpoint
from ..presets import apply_overrides, load_config_data
from ..results import read_stored_config as read_config_file
from ..rundir import RunDir


def read_stored_config(run: RunDir) -> dict:
    """The config a run stored (``results/config.yaml``) as a dict; a damaged file is a :class:`PreflightError`."""
    try:
        return read_config_file(run)
    except ConfigError as e:
        raise PreflightError(f"{e}: restore it, or start a new run with --start-from CHECKPOINT") from None


def find_run(storage_path: str, run: str) -> tuple[RunDir, str]:
    """The run folder of ``--resume RUN``: a run name under ``storage_path``, or (with a '/') a run folder;
    returns it with the storage path that holds it."""
    if "/" in run:
        folder = RunDir(storage.absolute(run.rstrip("/")))
        parent = folder.path.rsplit("/", 1)[0]
    else:
        try:
            folder, parent = RunDir.of(storage_path, run, what="--resume"), storage.absolute(storage_path)
        except ConfigError as e:
            raise PreflightError(str(e)) from None
    if not storage.exists(folder.config):
        raise PreflightError(f"--resume {run!r}: no run found at {folder.path} (no results/config.yaml); give the "
                             f"run name and the same run.storage_path, or the run directory")
    return folder, parent


def resume_storage_path(preset_or_path: str, overrides: list[str]) -> str:
    """Where ``--resume RUN`` looks for a run given by name: ``run.storage_path`` as the preset (or YAML file)
    and the overrides set it, read without validating the rest of the preset (the run has its own config)."""
    run = load_config_data(preset_or_path, overrides).get("run")
    path = run.get("storage_path") if isinstance(run, dict) else None
    return path if isinstance(path, str) and path.strip() else RunSection.model_fields["storage_path"].default


def load_run_config(storage_path: str, run: str, overrides: list[str]) -> tuple[Config, str, dict]:
    """The stored config of run ``run`` with ``overrides`` applied, the run's name, and the stored config as
    read (for the comparison of settings)."""
    folder, parent = find_run(storage_path, run)
    stored = read_stored_config(folder)
    return _continued(stored, {"run.storage_path": parent}, overrides), folder.name, stored


def _continued(saved: dict, values: dict, overrides: list[str]) -> Config:
    """A continuation's config: the ``saved`` config (left as it is) with ``values`` (``section.key``) set and
    the command's ``overrides`` on top, validated, the data settings against the benchmark included."""
    data = copy.deepcopy(saved)
    for key, value in values.items():
        set_dotted(data, key, value)
    apply_overrides(data, overrides)
    cfg = config_from_dict(data)
    check_data_config(cfg.data)
    return cfg


# What names a run rather than setting it: a branch is a new run, and no sweep's trial.
_IDENTITY = {"run.name": None, "tracking.sweep_id": None}


def load_start_config(checkpoint: str, overrides: list[str]) -> tuple[Config, dict]:
    """``--start-from CHECKPOINT``: the config saved in the checkpoint (the run it branches from), without that
    run's name and sweep, with ``overrides`` applied; and the checkpoint's learner state, read and verified
    once (:func:`~inflora_ray.preflight.read_start_checkpoint`)."""
    state = read_start_checkpoint(checkpoint)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise PreflightError(f"--start-from {checkpoint!r}: the checkpoint holds no config to start from")
    return _continued(saved, _IDENTITY, overrides), state


def result_changes(stored: dict, requested: Config) -> dict[str, tuple[Any, Any]]:
    """The config keys whose change alters results: ``{key: (stored value, requested value)}``."""
    old = flatten(stored)  # as stored: it need not validate here any more
    new = requested.flat()
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and alters_results(k)}


def check_config_change(stored: dict, requested: Config, allow: bool, what: str) -> dict[str, tuple[Any, Any]]:
    """Refuse a continuation whose config differs from ``stored`` in a key that alters results, unless
    ``allow``; returns the changes (to be recorded)."""
    changes = result_changes(stored, requested)
    if changes and not allow:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise PreflightError(f"{what} would change settings that alter results ({listed}); run with the stored "
                             "settings, or pass --allow-config-change to continue with the new ones (the change is "
                             "recorded in results/config_history.json and on the MLflow run)")
    return changes


def record_config_change(run: RunDir, changes: dict[str, tuple[Any, Any]], from_task: int, what: str,
                         tracker=None) -> None:
    """Append the change to ``results/config_history.json`` and tag the MLflow run with it."""
    path = run.config_history
    history = storage.read_json(path) if storage.exists(path) else []
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "how": what, "from_task": from_task,
             "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
    storage.write_json(path, [*history, entry])
    if tracker is not None:
        tracker.guard("recording a config change", lambda: tracker.client.set_tag(
            tracker.run_id, f"config_change_{len(history)}", tracker.redact(json.dumps(entry))[:5000]))


def next_task_of(run: RunDir) -> int:
    """The first task a resumed run will (re)train: the number of tasks with written results."""
    done = run.finished_tasks()
    n = 0
    while n in done:
        n += 1
    return n
