"""Errors that a restart of the workers cannot fix, and the marker that stops Ray Train from retrying them.

Ray Train (2.60, Train V2) retries every worker error up to ``FailureConfig.max_failures`` (forever with -1):
its failure policy has no notion of an error that will come back on every attempt. So a worker that hits
one (a bad config, unusable data, a damaged or mismatched checkpoint) writes ``<run dir>/.fatal.json``
(:attr:`RunDir.fatal_marker`) before it re-raises; every worker of a later attempt finds the marker and
returns at once, so the job ends after at most one restart, and the driver turns the marker into a
:class:`NonRetryableError` (:func:`raise_if_fatal`). A resumed run clears it first (:func:`clear_fatal`).

A store that kept failing with errors that pass (:class:`~inflora_ray.storage.TransientStorageError`, raised
once :func:`inflora_ray.storage.retrying` has spent its retries) is never fatal (:data:`RETRYABLE`): Ray Train
restarts the workers from the last checkpoint, up to ``run.max_failures`` times.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

from .. import storage
from ..logs import log_event
from ..redact import redact_text

if TYPE_CHECKING:
    from ..rundir import RunDir

log = logging.getLogger(__name__)


# Errors left to Ray Train's restarts even where a caller lists a base class of theirs among the fatal kinds.
RETRYABLE: tuple[type[BaseException], ...] = (storage.TransientStorageError,)


class NonRetryableError(RuntimeError):
    """An error that would come back on every attempt, so it is never retried, whatever
    ``run.max_failures`` says; the message says what to fix."""


def write_fatal(run: "RunDir", error: BaseException, **context) -> None:
    """Record ``error`` in the run's fatal marker (atomically; a failure to write it is logged, not raised,
    so the original error still propagates)."""
    record = {"type": type(error).__name__, "message": redact_text(str(error)), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **context}
    try:
        storage.write_json(run.fatal_marker, record)
    except Exception as e:  # the storage may be what failed; the error itself matters more
        log_event(log, "fatal_marker_unwritten", level=logging.ERROR, path=run.fatal_marker, error=repr(e))


def read_fatal(run: "RunDir") -> Optional[dict]:
    """The error recorded in the run's fatal marker (``type``, ``message``, ``time`` and where it happened),
    or None when there is none."""
    if not storage.exists(run.fatal_marker):
        return None
    try:
        record = storage.read_json(run.fatal_marker)
    except ValueError as e:  # written atomically, so this means someone else wrote the file
        return {"type": "unknown", "message": f"unreadable fatal-error marker {run.fatal_marker} ({e})"}
    return record if isinstance(record, dict) else {"type": "unknown", "message": repr(record)}


def clear_fatal(run: "RunDir") -> None:
    """Remove the run's fatal marker, if any (before a run is resumed)."""
    storage.delete(run.fatal_marker)


def fatal_message(record: dict) -> str:
    """A one-paragraph message for a fatal-marker record."""
    where = f" ({record['phase']}, rank {record.get('rank', '?')})" if record.get("phase") else ""
    return (f"{record.get('type', 'Error')}: {record.get('message', '')}{where}; not retried: "
            "a restart cannot fix this error")


def raise_if_fatal(run: "RunDir") -> None:
    """Raise :class:`NonRetryableError` with the recorded message if a worker wrote the fatal marker."""
    record = read_fatal(run)
    if record is not None:
        raise NonRetryableError(fatal_message(record))


@contextmanager
def fatal_errors_recorded(run: "RunDir", kinds: tuple[type[BaseException], ...], **context) -> Iterator[None]:
    """Inside the block, an exception of one of ``kinds`` is written to the fatal marker, then re-raised
    (one of :data:`RETRYABLE` is only re-raised)."""
    try:
        yield
    except kinds as e:
        if not isinstance(e, RETRYABLE):
            write_fatal(run, e, **context)
        raise
