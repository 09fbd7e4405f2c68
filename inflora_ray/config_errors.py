"""The config's error type, and pydantic's ValidationError turned into one naming the field (``data.root``,
``train.betas[1]``) and what it accepts, in the words of the config's own checks.

Imports nothing of the package: :mod:`inflora_ray.config` builds on it. A config section names itself in its
``section`` class variable (``"method"``, ...; ``""`` for the whole config), which is where an error's path
starts."""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo



class ConfigError(ValueError):
    """An invalid configuration; the message says which field and what to change."""


SHOWN_CHARS = 200  # a value quoted in a message is cut to this many characters


def shown(value: Any) -> str:
    """``repr(value)`` for a message, cut to :data:`SHOWN_CHARS` characters (a user's value can be huge)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def strip_optional(tp: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> X."""
    while typing.get_origin(tp) in (Annotated, Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def type_name(tp: Any) -> str:
    """How a message names a declared type: ``int``, ``one of 'a', 'b'``, ``a list of float``, ``int or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"a list of {type_name(args[0])}"
    return "a mapping" if tp is dict or origin is dict else getattr(tp, "__name__", str(tp))


def _resolve(root: type[BaseModel], loc: tuple) -> tuple[str, Any, FieldInfo | None]:
    """The dotted path (``data.class_order[2]``), declared type and field at a pydantic error location."""
    path = getattr(root, "section", "")
    tp, info = root, None
    for part in loc:
        if isinstance(part, int):  # an item of a list field
            path, tp, info = f"{path}[{part}]", typing.get_args(strip_optional(tp))[0], None
        elif part in getattr(tp, "model_fields", {}):
            info = tp.model_fields[part]
            path, tp = f"{path}.{part}".lstrip("."), info.annotation
    return path, tp, info


def _bounds(info: FieldInfo) -> str:
    """'>= 1', 'in (0, 1]', ... from a field's ge/gt/le/lt, then 'or null' and the field's description."""
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    c = {k: getattr(m, k) for m in info.metadata for k in ops if hasattr(m, k)}
    lo, hi = [k for k in ("ge", "gt") if k in c], [k for k in ("le", "lt") if k in c]
    if lo and hi:  # an interval such as (0, 1] or [0, 1)
        text = f"in {'[' if lo[0] == 'ge' else '('}{c[lo[0]]}, {c[hi[0]]}{']' if hi[0] == 'le' else ')'}"
    else:
        text = " and ".join(f"{ops[k]} {v}" for k, v in c.items())
    nullable = type(None) in typing.get_args(info.annotation)
    return text + " or null" * nullable + (f" ({info.description})" if info.description else "")


def config_error(err: ValidationError, root: type[BaseModel]) -> ConfigError:
    """The first error as a ConfigError: unknown keys (outermost first), then types and bounds, then checks."""
    def priority(e: Any) -> tuple:
        extra = e["type"] == "extra_forbidden"
        return not extra, isinstance(e.get("ctx", {}).get("error"), ConfigError), len(e["loc"]) * extra

    errors = err.errors()
    first = min(errors, key=priority)
    if isinstance(first.get("ctx", {}).get("error"), ConfigError):
        return first["ctx"]["error"]  # raised by a validator above, already worded
    if first["type"] == "extra_forbidden":
        parent = first["loc"][:-1]
        where, model, _ = _resolve(root, parent)
        unknown = sorted((e["loc"][-1] for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] == parent),
                         key=str)
        return ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys are {list(model.model_fields)}")
    path, tp, info = _resolve(root, first["loc"])
    where, value = path or "config", first["input"]
    if first["type"] == "finite_number":
        return ConfigError(f"{where}: must be a finite number")
    if first["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and info:
        return ConfigError(f"{where}: must be {_bounds(info)}")
    return ConfigError(f"{where}: expected {type_name(tp)}, got {shown(value)} ({type(value).__name__})")
