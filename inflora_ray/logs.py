"""Structured logs: one ``event key=value ...`` line per event (logfmt), or JSON lines.

``INFLORA_LOG_FORMAT=json`` switches to one JSON object per line; ``INFLORA_LOG_LEVEL`` sets the level.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

_FIELDS = "_inflora_fields"


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    s = str(v)
    return f'"{s}"' if (" " in s or "=" in s or s == "") else s


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool):
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = getattr(record, _FIELDS, None)
        if self.as_json:
            obj = {"ts": ts, "level": record.levelname.lower(), "logger": record.name}
            obj.update({"event": record.getMessage()} if fields is not None else {"msg": record.getMessage()})
            obj.update(fields or {})
            return json.dumps(obj, default=str)
        head = f"ts={ts} level={record.levelname.lower()} logger={record.name}"
        if fields is None:
            return f"{head} msg={_fmt_value(record.getMessage())}"
        return " ".join([head, f"event={record.getMessage()}"] + [f"{k}={_fmt_value(v)}" for k, v in fields.items()])


def setup_logging(level: str | None = None) -> None:
    """Configure the ``inflora_ray`` logger once per process (idempotent)."""
    logger = logging.getLogger("inflora_ray")
    as_json = os.environ.get("INFLORA_LOG_FORMAT", "logfmt").lower() == "json"
    level = (level or os.environ.get("INFLORA_LOG_LEVEL", "INFO")).upper()
    logger.setLevel(level)
    for h in logger.handlers:
        if getattr(h, "_inflora", False):
            h.setFormatter(_Formatter(as_json))
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._inflora = True
    handler.setFormatter(_Formatter(as_json))
    logger.addHandler(handler)
    logger.propagate = False


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields) -> None:
    """Log ``event`` with structured ``fields``."""
    logger.log(level, event, extra={_FIELDS: fields})
