"""Where configs come from: the YAML presets shipped in ``inflora_ray/configs``, YAML files (with ``base:``
inheritance) and ``section.key=value`` overrides, all validated into a :class:`~inflora_ray.config.Config`.

``inflora_ray/configs`` also holds the method recipes (``recipe-<method>.yaml``): fragments that presets and
user files list in ``base:`` after a benchmark, never run alone."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, config_from_dict, set_dotted
from .config_errors import shown
from .data.registry import check_data_config
from .yaml_io import BoundedYAMLError, load_yaml

RECIPE_PREFIX = "recipe-"
BASE_ACCEPTS = "a preset name, a YAML file path, or a non-empty list of them (merged left to right)"

_Chain = tuple[tuple[str, str], ...]


def _configs_dir():
    return resources.files("inflora_ray") / "configs"


def _shipped() -> list[str]:
    return sorted(p.name[:-5] for p in _configs_dir().iterdir() if p.name.endswith(".yaml"))


def list_presets() -> list[str]:
    """Names of the presets shipped in ``inflora_ray/configs`` (what ``--config`` runs; recipes excluded)."""
    return [name for name in _shipped() if not name.startswith(RECIPE_PREFIX)]


def list_recipes() -> list[str]:
    """Names of the method recipes shipped in ``inflora_ray/configs``: entries for ``base:``, not presets."""
    return [name for name in _shipped() if name.startswith(RECIPE_PREFIX)]


def _locate(name: str, folder: Path | None) -> tuple[str, str, Path | None]:
    """(identity, YAML text, folder of its relative bases) of a preset name, or of a YAML file path read
    relative to ``folder`` (the including file's folder; ``None``: the working directory)."""
    path = Path(name).expanduser()
    relative_to_folder = folder is not None and not path.is_absolute()
    if relative_to_folder:
        path = folder / path
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            where = f" (looked for {str(path)!r}, next to the file naming it)" if relative_to_folder else ""
            raise ConfigError(f"--config: file not found: {name!r}{where}")
        path = path.resolve()
        return str(path), path.read_text(), path.parent
    res = _configs_dir() / f"{name}.yaml"
    if not res.is_file():
        raise ConfigError(f"--config: {name!r} is neither a YAML file nor a preset; presets are {list_presets()}; "
                          f"method recipes (for base: only) are {list_recipes()}")
    return f"preset:{name}", res.read_text(), None


def _bases(name: str, base: Any) -> list[str]:
    """The entries of a ``base:`` value: one name or path, or a non-empty list of them."""
    entries = [base] if isinstance(base, str) else base
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(f"--config {name!r}: base: expected {BASE_ACCEPTS}; got {base!r}")
    return entries


def _read_yaml(name: str, chain: _Chain = (), folder: Path | None = None) -> dict:
    """The mapping of a preset or YAML file, merged over its ``base:`` entries left to right; ``chain``: the
    (identity, name) read so far on the way here, ``folder``: where a relative path in ``name`` is read from."""
    ident, text, own_folder = _locate(name, folder)
    chain = (*chain, (ident, name))
    if ident in [i for i, _ in chain[:-1]]:
        raise ConfigError(f"--config {chain[0][1]}: base: cycle {' -> '.join(n for _, n in chain)}")
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {name!r}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {name!r}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    merged: dict = {}
    for entry in _bases(name, base):
        _deep_update(merged, _read_yaml(entry, chain, own_folder))
    return _deep_update(merged, data)


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "kwargs":
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. method.rank=8")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() != "" else None
    except BoundedYAMLError as e:
        raise ConfigError(f"override {shown(text)}: {e}") from None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a nested dict in place."""
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        try:
            set_dotted(data, key, value)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {str(e).removeprefix(key + ': ')}") from None
    return data


def _refuse_recipe(name: str) -> None:
    if name in list_recipes():
        method = name.removeprefix(RECIPE_PREFIX)
        runs = [p for p in list_presets() if p.startswith(f"{method}-")]
        raise ConfigError(f"--config {name!r} is a method recipe, not a preset: it names no benchmark. Run one of "
                          f"{runs}, or list it in base: after a benchmark, e.g. base: [cifar100-10, {name}]")


def load_config_data(preset_or_path: str = "quickstart", overrides: list[str] | None = None) -> dict:
    """The mapping of a preset or YAML file (its ``base:`` chain merged) with the overrides applied, not
    validated."""
    _refuse_recipe(preset_or_path)
    data = _read_yaml(preset_or_path)
    return apply_overrides(data, list(overrides or []))


def load_config(preset_or_path: str = "quickstart", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML file, apply overrides, validate: every field, and the data settings against
    the benchmark (:func:`~inflora_ray.data.registry.check_data_config`)."""
    cfg = config_from_dict(load_config_data(preset_or_path, overrides))
    check_data_config(cfg.data)
    return cfg
