"""Which MLflow store a run uses and whether it can be used: the URI, the server's health, what to do
when the store refuses (a missing database driver, MLflow 3's refusal of the file store, credentials), and
which of its errors pass (:func:`is_transient_tracking`) and are retried (:func:`retry_call`)."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Optional, TypeVar

from .. import storage
from ..config import Config
from ..logs import log_event
from ..redact import has_secrets, is_redacted, redact_text, redact_uri

log = logging.getLogger(__name__)

# The module that a database URI's SQLAlchemy dialect imports -> how to install it.
_DRIVERS = {
    "psycopg": "pip install 'psycopg[binary]' (or pip install psycopg2-binary and write postgresql+psycopg2://)",
    "psycopg2": "pip install psycopg2-binary",
    "MySQLdb": "pip install mysqlclient (or pip install PyMySQL and write mysql+pymysql://)",
    "pymysql": "pip install PyMySQL",
    "pymssql": "pip install pymssql",
    "pyodbc": "pip install pyodbc",
}


T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be used at start; the message says what to fix."""


def store_call(uri: str, doing: str, fn: Callable[[], T]) -> T:
    """``fn()``; any error becomes :class:`TrackingUnavailable` saying what to fix (:func:`explain_store_error`),
    without the credentials of ``uri``."""
    try:
        return fn()
    except TrackingUnavailable:
        raise
    except Exception as e:  # noqa: BLE001  (any store error becomes a message saying what to fix)
        raise TrackingUnavailable(explain_store_error(uri, doing, e)) from None


def resolve_uri(cfg: Config) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else MLflow's default (a local store in the working dir).

    A tracking.uri whose credentials were redacted (the stored config of a resumed run) gives way to
    MLFLOW_TRACKING_URI when that is set; else it stays, and :class:`Tracker` refuses it with a message."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    if cfg.tracking.uri and is_redacted(cfg.tracking.uri) and env:
        return env
    return cfg.tracking.uri or env or mlflow.get_tracking_uri()


def pin_uri(uri: str) -> str:
    """``uri`` with a local store's relative path made absolute (``sqlite:///mlflow.db``, ``file:./mlruns``,
    ``mlruns``), so that processes with another working directory (Tune trials, Train workers) open the same
    store; other URIs are returned as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and ":memory:" not in uri:
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file://" + os.path.abspath(uri[len("file:"):])
    if "://" not in uri and not uri.startswith(("file:", "databricks", "sqlite:")) and ":" not in uri.split("/")[0]:
        return os.path.abspath(uri)
    return uri


# The settings that may be URIs with credentials in them (``s3://KEY:SECRET@bucket/...``, ``?access_token=``).
CREDENTIAL_KEYS = ("tracking.uri", "run.storage_path", "data.shards", "data.root")


def credential_values(cfg: Config) -> dict[str, str]:
    """The settings of :data:`CREDENTIAL_KEYS` whose values hold credentials (as given, unredacted)."""
    flat = cfg.flat()
    return {k: v for k in CREDENTIAL_KEYS if isinstance(v := flat[k], str) and has_secrets(v)}


def redact_config(cfg: Config) -> Config:
    """``cfg`` with the credentials taken out of every setting of :data:`CREDENTIAL_KEYS`: the config a run or
    sweep may store (config.yaml, sweep.json, best_config.yaml, a checkpoint), log or hand to Ray."""
    found = credential_values(cfg)
    return cfg.with_values({k: redact_uri(v) for k, v in found.items()}) if found else cfg


def restore_credentials(cfg: Config, source: Config) -> Config:
    """``cfg`` (made from a redacted config) with each redacted setting of :data:`CREDENTIAL_KEYS` that is the
    redacted form of ``source``'s replaced by ``source``'s value, credentials included."""
    flat = cfg.flat()
    back = {k: v for k, v in credential_values(source).items()
            if isinstance(mine := flat[k], str) and is_redacted(mine) and mine == redact_uri(v)}
    return cfg.with_values(back) if back else cfg


def redacted_settings(cfg: Config, keys=CREDENTIAL_KEYS) -> dict[str, str]:
    """The settings of ``keys`` whose credentials were redacted (a stored config read back): they cannot be used
    as they are (a path named ``***``, a store that refuses the request) and must be given again."""
    flat = cfg.flat()
    return {k: v for k in keys if isinstance(v := flat[k], str) and is_redacted(v)}


def _health_url(uri: str) -> str:
    """``<uri>/health`` without the URI's user info and query (the health check needs no credentials)."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path.rstrip('/')}/health"


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast if an HTTP tracking server does not answer its health check (messages show no credentials)."""
    if not uri.startswith(("http://", "https://")):
        return
    shown = redact_uri(uri)
    try:
        with urllib.request.urlopen(_health_url(uri), timeout=timeout) as resp:
            if resp.status != 200:
                raise TrackingUnavailable(f"MLflow server at {shown} answered {resp.status} on /health")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = redact_text(str(getattr(e, "reason", e)), uri)
        raise TrackingUnavailable(
            f"MLflow tracking server at {shown} is unreachable ({reason}); start it "
            f"(mlflow server --host 127.0.0.1 --port PORT), fix tracking.uri / --tracking-uri / MLFLOW_TRACKING_URI, "
            "or run with tracking.enabled=false") from None


def _is_file_store(uri: str) -> bool:
    """True for MLflow's file store: a ``file:`` URI or a plain path."""
    try:
        return urllib.parse.urlsplit(uri).scheme in ("", "file")
    except ValueError:  # not a URI at all
        return False


def _http_status(e: Exception) -> Optional[int]:
    """The HTTP status of a failed MLflow REST call: from a non-JSON answer's message ('error code 401'),
    else from the error's code (a JSON answer such as PERMISSION_DENIED), if any."""
    found = re.search(r"error code (\d{3})", str(e))
    if found:
        return int(found.group(1))
    get = getattr(e, "get_http_status_code", None)
    return get() if callable(get) else None


def explain_store_error(uri: str, doing: str, e: Exception) -> str:
    """What went wrong with the tracking store at ``uri`` while ``doing``, and what to do; no credentials."""
    shown = redact_uri(uri)
    if isinstance(e, ImportError) and e.name:
        module = e.name.split(".")[0]
        return (f"MLflow at {shown}: the database driver {module!r} is not installed; "
                f"{_DRIVERS.get(module, f'pip install {module}')}")
    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1")
    if _is_file_store(uri) and not allowed:
        return (f"MLflow at {shown}: MLflow refuses the file store (in maintenance mode); use a database store, e.g. "
                "--tracking-uri sqlite:///mlflow.db (`mlflow migrate-filestore` moves an old ./mlruns into one), "
                "or set MLFLOW_ALLOW_FILE_STORE=true to keep the file store")
    status = _http_status(e)
    if status in (401, 403):
        return (f"MLflow at {shown} refused the credentials (HTTP {status}) while {doing}: set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user allowed to write to the experiment")
    detail = redact_text(f"{type(e).__name__}: {e}", uri)[:300]
    return (f"MLflow at {shown}: {doing} failed ({detail}); fix tracking.uri / --tracking-uri / "
            "MLFLOW_TRACKING_URI, or run with tracking.enabled=false")


# ---------------------------------------------------------------------------------------- transient errors
# The total wait for one MLflow call before what it wrote is deferred (the tracker's backlog): storage's
# policy (inflora_ray.storage.RetryPolicy and its INFLORA_STORAGE_RETRY* variables: about a minute) unless this
# variable says otherwise; 0: no retry, defer at once.
RETRY_WAIT_ENV = storage.TRACKING_RETRY_ENV
# What MLflow's REST client (requests, urllib3) says about a connection lost, refused or timed out, and about a
# server that kept answering 408/429/5xx; a sqlite store's lock held by another writer.
_TRANSIENT_TEXT = re.compile(
    r"[Cc]onnection (?:refused|reset|aborted)|NewConnectionError|ConnectTimeout|ReadTimeout|RemoteDisconnected|"
    r"ProtocolError|IncompleteRead|timeout exception|[Tt]imed out|too many (?:408|429|5\d\d) error responses|"
    r"Broken pipe|[Tt]emporary failure in name resolution|database is locked|temporarily unavailable")


def retry_policy() -> storage.RetryPolicy:
    """How the tracker retries an MLflow call: :meth:`storage.RetryPolicy.from_env` with its total wait
    replaced by :data:`RETRY_WAIT_ENV` when set. A ``ValueError`` names a bad value."""
    policy = storage.RetryPolicy.from_env()
    text = os.environ.get(RETRY_WAIT_ENV, "").strip()
    if not text:
        return policy
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"{RETRY_WAIT_ENV}={text!r}: expected a finite number of seconds, at least 0")
    return dataclasses.replace(policy, max_seconds=seconds)


def is_transient_tracking(error: BaseException) -> bool:
    """True for an MLflow error that may pass if the same call is made again: a connection refused, reset
    or timed out (a server restarting, a load balancer's hiccup), an answer 408, 429 or 5xx, a locked sqlite
    store. False for what the store will refuse again (4xx: invalid parameter, permission denied, resource does
    not exist) and for any other error."""
    from mlflow.exceptions import RestException

    if isinstance(error, RestException):  # the server answered with an error of its own
        status = error.get_http_status_code()
        return status in (408, 429) or status >= 500
    found = re.search(r"error code (\d{3})", str(error))  # an answer that was not MLflow's JSON
    if found:
        status = int(found.group(1))
        return status in (408, 429) or status >= 500
    if _TRANSIENT_TEXT.search(str(error)):
        return True
    return isinstance(error, OSError) and storage.is_transient(error)


def retry_call(uri: str, doing: str, fn: Callable[[], T], policy: storage.RetryPolicy | None = None) -> T:
    """``fn()``, made again after each transient error (:func:`is_transient_tracking`) with exponential
    backoff and jitter as ``policy`` says (default :func:`retry_policy`), each retry logged as a
    ``tracking_retry`` event. A permanent error, or the last transient one once the retries are spent, is
    raised as it came."""
    policy = policy or retry_policy()
    start, failures = time.monotonic(), 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient_tracking(e):
                raise
            failures += 1
            waited, delay = time.monotonic() - start, policy.delay(failures)
            if failures >= policy.attempts or waited + delay > policy.max_seconds:
                raise
            log_event(log, "tracking_retry", level=logging.WARNING, doing=doing, attempt=failures + 1,
                      wait_s=round(delay, 2), error=redact_text(f"{type(e).__name__}: {e}", uri)[:300])
            time.sleep(delay)
