"""Structured logs: one ``event key=value ...`` line per event (logfmt), or JSON lines.

``INFLORA_LOG_FORMAT=json`` switches to one JSON object per line; ``INFLORA_LOG_LEVEL`` sets the console's
level. The console of ``inflora-run`` / ``inflora-tune`` shows warnings and errors only, beside the commands'
own progress lines, unless they run with ``--verbose`` (:func:`setup_logging`); a Ray Train worker logs every
event of its run to the run's log (:func:`attach_run_log`) and to its own stderr, which Ray keeps in its logs.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Callable, Optional

from .redact import redact_text

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
        """The event as one line, with the credentials of every URL in it redacted."""
        return redact_text(self._line(record))

    def _line(self, record: logging.LogRecord) -> str:
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


_VERBOSE = False


def is_verbose() -> bool:
    """Whether this process's console shows every event (``--verbose``), including the Ray workers' (which the
    driver then asks Ray to forward)."""
    return _VERBOSE


def _formatter() -> _Formatter:
    return _Formatter(os.environ.get("INFLORA_LOG_FORMAT", "logfmt").lower() == "json")


def setup_logging(level: str | None = None, verbose: bool | None = None) -> None:
    """Configure the ``inflora_ray`` logger of this process (idempotent): events at INFO and above reach its
    handlers; the console (stderr) shows them from ``level``, else ``INFLORA_LOG_LEVEL``, else INFO. With
    ``verbose=False`` (a run's or sweep's driver without ``--verbose``) the console default is WARNING: the
    command prints its own progress lines, and the events are in the run's log."""
    global _VERBOSE
    if verbose is not None:
        _VERBOSE = verbose
    logger = logging.getLogger("inflora_ray")
    default = "WARNING" if verbose is False else "INFO"
    console_level = (level or os.environ.get("INFLORA_LOG_LEVEL", default)).upper()
    logger.setLevel(min(logging.INFO, logging.getLevelName(console_level)))
    logger.propagate = False
    for h in logger.handlers:
        if getattr(h, "_inflora", False):
            h.setFormatter(_formatter())
            h.setLevel(console_level)
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._inflora = True
    handler.setFormatter(_formatter())
    handler.setLevel(console_level)
    logger.addHandler(handler)


class RunLogHandler(logging.Handler):
    """Writes every event of this process, formatted as on the console, to a run's log.

    On a file system (local or NFS) every process of the run appends its lines to the same ``run.log``, each
    line written whole and flushed at once. An object store cannot append: there each process keeps its lines
    and writes them as its own object (``logs/<process>.log``) at once for a warning or an error, else at most
    every ``upload_seconds``, and when the handler is closed, with ``write_object(path, data)`` (the run's
    storage writer, :func:`inflora_ray.storage.write_bytes`: this module stays below the storage layer).

    A write that fails (the store is unreachable for a while) keeps the lines for the next write and says
    nothing: the storage layer logs its own retries, and a traceback per line would drown them."""

    def __init__(self, path: str, write_object: Optional[Callable[[str, bytes], None]] = None,
                 upload_seconds: float = 30.0):
        super().__init__(logging.INFO)
        self.path = path
        self.remote = "://" in path
        if self.remote and write_object is None:
            raise ValueError(f"run log {path}: an object-store path needs write_object")
        self.write_object = write_object
        self.upload_seconds = upload_seconds
        self._lines: list[str] = []
        self._uploaded = time.monotonic()
        self._file = None
        if not self.remote:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")
        self.setFormatter(_formatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
                return
            self._lines.append(line)
            # a warning or an error is written at once: the process may be about to be lost
            if record.levelno >= logging.WARNING or time.monotonic() - self._uploaded > self.upload_seconds:
                self.flush()
        except Exception:  # logging must never stop the run
            self.handleError(record)

    def flush(self) -> None:
        """Write what an object store's log has gathered (a file's lines are written as they come)."""
        if self.remote and self._lines:
            try:
                self.write_object(self.path, "".join(self._lines).encode())
            except OSError:  # kept for the next write (see the class docstring)
                return
            self._uploaded = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
            if self._file is not None:
                self._file.close()
        finally:
            super().close()


def attach_run_log(path: str, write_object: Optional[Callable[[str, bytes], None]] = None) -> RunLogHandler:
    """Send every ``inflora_ray`` event of this process to the run log at ``path`` until
    :func:`detach_run_log` (``write_object`` writes it on an object store, see :class:`RunLogHandler`)."""
    handler = RunLogHandler(path, write_object)
    logger = logging.getLogger("inflora_ray")
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    logger.addHandler(handler)
    return handler


def detach_run_log(handler: RunLogHandler) -> None:
    """Stop writing to the run log of ``handler`` (writing what it still holds)."""
    logging.getLogger("inflora_ray").removeHandler(handler)
    handler.close()


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields) -> None:
    """Log ``event`` with structured ``fields``."""
    logger.log(level, event, extra={_FIELDS: fields})
