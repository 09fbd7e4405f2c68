"""Which MLflow store a run uses and whether it can be used: the URI, the server's health, and what to do
when the store refuses (a missing database driver, MLflow 3's refusal of the file store, credentials)."""
from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Optional, TypeVar

from ..config import Config
from ..redact import has_secrets, is_redacted, redact_text, redact_uri

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


def redact_config(cfg: Config) -> Config:
    """``cfg`` with the credentials taken out of tracking.uri: the config a run may store (config.yaml)."""
    if cfg.tracking.uri is None or not has_secrets(cfg.tracking.uri):
        return cfg
    return cfg.with_values({"tracking.uri": redact_uri(cfg.tracking.uri)})


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
