"""Where configs come from: the YAML presets shipped in ``inflora_ray/configs``, YAML files (with ``base:``
inheritance) and ``section.key=value`` overrides, all validated into a :class:`~inflora_ray.config.Config`."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, config_from_dict, set_dotted


def list_presets() -> list[str]:
    """Names of the presets shipped in ``inflora_ray/configs``."""
    root = resources.files("inflora_ray") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(preset_or_path: str, chain: tuple[tuple[str, str], ...] = ()) -> dict:
    """The mapping of a preset or YAML file, merged over its ``base:`` chain; ``chain``: (id, name) read so far."""
    path = Path(preset_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {preset_or_path!r}")
        ident, text = str(path.resolve()), path.read_text()
    else:
        res = resources.files("inflora_ray") / "configs" / f"{preset_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"--config: {preset_or_path!r} is neither a YAML file nor a preset; "
                              f"presets are {list_presets()}")
        ident, text = f"preset:{preset_or_path}", res.read_text()
    chain = (*chain, (ident, preset_or_path))
    if ident in [i for i, _ in chain[:-1]]:
        raise ConfigError(f"--config {chain[0][1]}: base: cycle {' -> '.join(name for _, name in chain)}")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {preset_or_path!r}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {preset_or_path!r}: top level must be a mapping of sections")
    base = data.pop("base", None)
    return data if base is None else _deep_update(_read_yaml(str(base), chain), data)


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
        value = yaml.safe_load(raw) if raw.strip() != "" else None
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


def load_config(preset_or_path: str = "quickstart", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML file, apply overrides, validate."""
    data = _read_yaml(preset_or_path)
    apply_overrides(data, list(overrides or []))
    return config_from_dict(data)
