"""Run storage on a local path or an object store (s3://, gs://, ...) through pyarrow's filesystems.

Writes are atomic where the filesystem allows it (write a temporary name, then move), so a reader never
sees a half-written file.

Errors that pass (a lost connection, a timeout, throttling, a server error, an expired token being renewed:
:func:`is_transient`) are retried with exponential backoff and jitter (:func:`retrying`, :class:`RetryPolicy`):
by default for up to a minute, at least about 30 s. When the retries are spent the error is raised as a
:class:`TransientStorageError`, which a run's workers never record as fatal, so Ray Train restarts them from
the last checkpoint when ``run.max_failures`` allows. Anything else (a missing file, a refused permission, a
full disk) is raised at once, as it came.
"""
from __future__ import annotations

import errno as errnos
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar
from urllib.parse import unquote

import pyarrow.fs as pafs

from .logs import log_event
from .redact import has_secrets, redact_text

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths (object stores, remote filesystems)."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (Ray needs absolute storage paths); URIs unchanged."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' (URIs) or the OS separator (local paths)."""
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


# The AWS SDKs' variables for an S3-compatible store (MinIO, Ceph, R2, a loopback server): boto3, the AWS CLI
# and MLflow honour them, pyarrow's S3 filesystem does not, so s3:// paths get the endpoint from here.
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_endpoint() -> str | None:
    """The S3 endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (None: AWS itself)."""
    for var in ENDPOINT_VARS:
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    return None


# What a process needs, besides credentials, to reach the S3-compatible store this one reaches: the endpoint and
# the region it signs for (read by _s3_with_endpoint). Ray passes none of them on by itself (Ray Tune passes
# the AWS keys to its trials, Ray Train nothing), so the driver hands them to the processes of its Ray job.
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_env() -> dict[str, str]:
    """What the processes a run or sweep starts on other nodes need of this process's environment: the retry
    settings it was given (:data:`RETRY_SETTING_VARS`), and its S3 endpoint settings (:data:`ENDPOINT_VARS`, and
    :data:`REGION_VARS` with them; none without an endpoint: on AWS itself each node resolves its region).
    Credentials are never among them: every node gets its own (an instance role, the job's runtime env), so
    that they are written nowhere by the project."""
    names = RETRY_SETTING_VARS + (ENDPOINT_VARS + REGION_VARS if s3_endpoint() is not None else ())
    return {var: os.environ[var] for var in names if os.environ.get(var, "").strip()}


def _s3_with_endpoint(endpoint: str, keys: dict | None = None) -> pafs.S3FileSystem:
    scheme, sep, host = endpoint.partition("://")
    if not sep or scheme not in ("http", "https") or not host:
        raise OSError(f"S3 endpoint {endpoint!r} (from {'/'.join(ENDPOINT_VARS)}): expected http(s)://host[:port]")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # Path-style addressing (the default with an endpoint override): bucket names need no DNS entries.
    return pafs.S3FileSystem(endpoint_override=host.rstrip("/"), scheme=scheme, region=region, **(keys or {}))


def _s3_keys(path: str) -> tuple[dict, str]:
    """The access keys written in an ``s3://KEY:SECRET@bucket/...`` URI (as pyarrow reads them from such a URI)
    and the path inside the store (bucket/key, without them)."""
    rest = path[len("s3://"):].split("?", 1)[0]
    user_info, at, inside = rest.partition("/")[0].rpartition("@")
    if not at:
        return {}, rest
    key, _, secret = user_info.partition(":")
    return {"access_key": unquote(key), "secret_key": unquote(secret)}, inside + rest[len(rest.partition("/")[0]):]


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``path`` and the path inside it; ``s3://`` paths go to the endpoint in
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` when one is set (with the keys of an
    ``s3://KEY:SECRET@bucket`` URI, as pyarrow takes them without an endpoint)."""
    if path.startswith("s3://") and s3_endpoint() is not None:
        keys, inside = _s3_keys(path)
        return _s3_with_endpoint(s3_endpoint(), keys), inside
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def ray_storage(path: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: an ``s3://`` path on a store given by
    ``AWS_ENDPOINT_URL[_S3]`` becomes the path inside an S3 filesystem with that endpoint (Ray resolves URIs
    with pyarrow, which ignores those variables), and so does a URI with credentials in it (Ray shows and
    records its storage path: it gets the path without them, the filesystem holds them); anything else is left
    to Ray."""
    if (path.startswith("s3://") and s3_endpoint() is not None) or (is_uri(path) and has_secrets(path)):
        fs, inside = filesystem(path)
        return inside, fs
    return absolute(path), None


# ---------------------------------------------------------------------------------------- transient errors
# The retry policy's defaults; each can be overridden by the environment variable beside it (read at every
# call, so tests and the worker processes of a cluster can set it). Waits double from RETRY_BASE_SECONDS up to
# RETRY_CAP_SECONDS, each drawn in [1/2, 1] of its nominal value: with the defaults the 11 waits between 12
# attempts add up to 32-64 s, cut at RETRY_MAX_SECONDS, so an outage of about 30 s is always ridden out.
RETRY_ATTEMPTS = 12
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 8.0
RETRY_MAX_SECONDS = 60.0
RETRY_ENV = {"attempts": "INFLORA_STORAGE_RETRIES", "base_seconds": "INFLORA_STORAGE_RETRY_BASE_SECONDS",
             "cap_seconds": "INFLORA_STORAGE_RETRY_CAP_SECONDS", "max_seconds": "INFLORA_STORAGE_RETRY_MAX_SECONDS"}
# The total wait for one MLflow call (inflora_ray.tracking.store), named here with the storage settings that
# runs on other nodes get from the driver (forwarded_env).
TRACKING_RETRY_ENV = "INFLORA_TRACKING_RETRY_MAX_SECONDS"
RETRY_SETTING_VARS = (*RETRY_ENV.values(), TRACKING_RETRY_ENV)


class TransientStorageError(OSError):
    """The store kept failing with errors that pass (:func:`is_transient`) until the retries were spent: an
    outage, not a damaged or missing file. Not a ``ValueError``: a run's workers never record it as fatal, so
    Ray Train restarts them from the last checkpoint when ``run.max_failures`` allows."""


@dataclass(frozen=True)
class RetryPolicy:
    """How :func:`retrying` retries: at most ``attempts`` attempts within ``max_seconds``, waiting
    ``base_seconds`` x 2^k (at most ``cap_seconds``) times a random factor in [0.5, 1] after the k-th failure."""
    attempts: int = RETRY_ATTEMPTS
    base_seconds: float = RETRY_BASE_SECONDS
    cap_seconds: float = RETRY_CAP_SECONDS
    max_seconds: float = RETRY_MAX_SECONDS

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """The defaults, with the values set in :data:`RETRY_ENV`'s variables; a ``ValueError`` names a bad one."""
        values = {}
        for field, var in RETRY_ENV.items():
            text = os.environ.get(var, "").strip()
            if not text:
                continue
            try:
                value = int(text) if field == "attempts" else float(text)
            except ValueError:
                value = -1
            if not value >= (1 if field == "attempts" else 0) or value == float("inf"):
                raise ValueError(f"{var}={text!r}: expected a finite number, at least "
                                 f"{1 if field == 'attempts' else 0}{' (an integer)' if field == 'attempts' else ''}")
            values[field] = value
        return cls(**values)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1, 2, ...)."""
        nominal = min(self.cap_seconds, self.base_seconds * 2 ** min(failures - 1, 60))
        return nominal * random.uniform(0.5, 1.0)  # jitter: workers that failed together do not retry together


# Errno values of errors that pass, and of errors that stay (a local file system's answers).
_TRANSIENT_ERRNOS = {errnos.ECONNRESET, errnos.ECONNREFUSED, errnos.ECONNABORTED, errnos.ETIMEDOUT, errnos.EPIPE,
                     errnos.EHOSTUNREACH, errnos.ENETUNREACH, errnos.ENETDOWN, errnos.ENETRESET, errnos.EAGAIN,
                     errnos.ESTALE}  # ESTALE: an NFS handle the server dropped; opening again finds the file
_PERMANENT_ERRNOS = {errnos.ENOENT, errnos.EACCES, errnos.EPERM, errnos.ENOSPC, errnos.EFBIG, errnos.EROFS,
                     errnos.EDQUOT, errnos.EISDIR, errnos.ENOTDIR, errnos.EEXIST, errnos.EINVAL, errnos.ENAMETOOLONG,
                     errnos.EIO}
# What pyarrow's S3 and GCS clients (and curl under them) say about a lost connection, a timeout, throttling,
# a server error or credentials that expired (and are renewed by their provider): "AWS Error
# NETWORK_CONNECTION during GetObject operation: curlCode: 56, ...", "AWS Error SLOW_DOWN", "HTTP status 503".
_TRANSIENT_TEXT = re.compile(
    r"NETWORK_CONNECTION|curlCode|SLOW_DOWN|SlowDown|SERVICE_UNAVAILABLE|ServiceUnavailable|THROTTLING|Throttl|"
    r"TooManyRequests|reduce your request rate|REQUEST_TIMEOUT|RequestTimeout\b|INTERNAL_FAILURE|InternalError|"
    r"EXPIRED_TOKEN|ExpiredToken|REQUEST_EXPIRED|RequestExpired|token (?:has |is )?expired|InvalidToken|"
    r"HTTP status (?:408|429|5\d\d)|[Cc]onnection (?:reset|refused|aborted|closed)|[Tt]imed out|"
    r"Timeout was reached|Broken pipe|Could(?: not|n't) connect|Failure when (?:receiving|sending)|"
    r"name resolution|temporarily unavailable|\bUNAVAILABLE\b|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED")
# ... and about a request that will be refused again: no such bucket or key, no permission, wrong keys.
_PERMANENT_TEXT = re.compile(
    r"ACCESS_DENIED|AccessDenied|PERMISSION_DENIED|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|"
    r"SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|NO_SUCH_BUCKET|NoSuchBucket|NO_SUCH_KEY|NoSuchKey|"
    r"RESOURCE_NOT_FOUND|\bNOT_FOUND\b|InvalidBucketName|HTTP status 4\d\d")


def is_transient(error: BaseException, path: Optional[str] = None) -> bool:
    """True for an error that may not come back if the same request is made again: a lost or refused
    connection, a timeout, throttling (S3 ``SlowDown``, HTTP 429/503), a server error (5xx), an expired token.

    False for anything that is not an ``OSError`` (pyarrow's ``ArrowInvalid``, a decoding error), a missing
    file (local or remote: the stores inflora-ray reads are strongly consistent, and shard files are listed and
    checked before a run reads them), a refused permission, wrong credentials, a full disk. An ``OSError`` that
    says neither is taken as transient on an object store (``path`` a URI: most likely the network) and as
    permanent on a local or NFS path (``file://`` URIs included)."""
    if isinstance(error, TransientStorageError):
        return True
    if not isinstance(error, OSError):
        return False
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)) or error.errno in _TRANSIENT_ERRNOS:
        return True
    if error.errno in _PERMANENT_ERRNOS:
        return False
    text = str(error)
    if _TRANSIENT_TEXT.search(text):
        return True
    if _PERMANENT_TEXT.search(text):
        return False
    return path is not None and is_uri(path) and not path.startswith("file://")


def describe_error(error: BaseException) -> str:
    """``Type: message`` on one line (pyarrow's messages can span several), credentials redacted."""
    return redact_text(f"{type(error).__name__}: {' '.join(str(error).split())}")


_local = threading.local()  # .quiet: this thread is logging a retry (a run log on an object store writes here)


def retrying(operation: str, path: str, call: Callable[[], T], policy: Optional[RetryPolicy] = None) -> T:
    """``call()``, made again after each transient error (:func:`is_transient`) as ``policy`` says (default:
    :meth:`RetryPolicy.from_env`); each retry is logged as a ``storage_retry`` event naming ``operation`` (a
    verb: "read", "write", ...), ``path`` (redacted) and the attempt. A permanent error is raised at once, as
    it came; when the retries are spent, a :class:`TransientStorageError` saying so is raised from the last
    error. Within the logging of a retry (the run's log being written to the store) ``call`` is made once."""
    if getattr(_local, "quiet", False):
        return call()
    policy = policy or RetryPolicy.from_env()
    start = time.monotonic()
    failures = 0
    while True:
        try:
            return call()
        except TransientStorageError:
            raise  # an inner call already spent its retries
        except Exception as e:
            if not is_transient(e, path):
                raise
            failures += 1
            waited, delay = time.monotonic() - start, policy.delay(failures)
            if failures >= policy.attempts or waited + delay > policy.max_seconds:
                raise TransientStorageError(
                    f"cannot {operation} {redact_text(path)}: the store failed {failures} time(s) in {waited:.0f} s "
                    f"with errors that usually pass (last: {describe_error(e)}); the run can restart from its "
                    "last checkpoint (run.max_failures)") from e
            _local.quiet = True
            try:
                log_event(log, "storage_retry", level=logging.WARNING, operation=operation, path=redact_text(path),
                          attempt=failures + 1, attempts=policy.attempts, wait_s=round(delay, 2),
                          error=describe_error(e)[:500])
            finally:
                _local.quiet = False
            time.sleep(delay)


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest (``hashlib`` algorithm name) of the bytes of ``path`` (local or URI), read in 4 MiB chunks."""
    def digest() -> str:  # a failed attempt starts again from the first byte
        h = hashlib.new(algorithm)
        fs, p = filesystem(path)
        with fs.open_input_stream(p) as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        return h.hexdigest()

    return retrying("read", path, digest)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + move), creating parent directories; transient
    errors are retried (:func:`retrying`). A failed write leaves no temporary file and raises ``OSError``
    naming ``path`` (:class:`TransientStorageError` when the store kept failing with errors that pass)."""
    def attempt() -> None:
        fs, p = filesystem(path)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            fs.move(tmp, p)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except Exception:  # noqa: S110 (never written, or the store is gone: nothing more to do)
                pass
            raise

    try:
        retrying("write", path, attempt)
    except TransientStorageError:
        raise
    except Exception as e:  # pyarrow raises OSError and ArrowInvalid variants
        raise OSError(getattr(e, "errno", None), redact_text(f"cannot write {path} ({type(e).__name__}: {e})")) from e


def delete(path: str) -> None:
    """Delete the file ``path`` if it is there (a local path or a URI); transient errors are retried."""
    def attempt() -> None:
        fs, p = filesystem(path)
        try:
            fs.delete_file(p)
        except FileNotFoundError:
            pass

    retrying("delete", path, attempt)


def read_bytes(path: str) -> bytes:
    """The contents of ``path``; transient errors are retried (:func:`retrying`)."""
    def attempt() -> bytes:
        fs, p = filesystem(path)
        with fs.open_input_stream(p) as f:
            return f.read()

    return retrying("read", path, attempt)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def read_json(path: str):
    return json.loads(read_bytes(path))


def exists(path: str) -> bool:
    """Whether ``path`` is there (a file or a directory); transient errors are retried."""
    def attempt() -> bool:
        fs, p = filesystem(path)
        return fs.get_file_info(p).type != pafs.FileType.NotFound

    return retrying("look up", path, attempt)


def list_names(path: str) -> list[str]:
    """Names directly under directory ``path`` (empty if it does not exist); transient errors are retried."""
    def attempt() -> list[str]:
        fs, p = filesystem(path)
        if fs.get_file_info(p).type == pafs.FileType.NotFound:
            return []
        return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p)))

    return retrying("list", path, attempt)


def check_writable(path: str) -> None:
    """Create ``path`` and write/delete a probe file; raise OSError saying what to fix if that fails."""
    try:
        fs, p = filesystem(path)
        fs.create_dir(p, recursive=True)
        probe = (posixpath.join if is_uri(path) else os.path.join)(p, f".write-probe-{uuid.uuid4().hex[:8]}")
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError/ArrowInvalid variants
        raise OSError(redact_text(f"storage path {path!r} is not writable ({type(e).__name__}: {e}); give a writable "
                                  "local directory, NFS path, or s3:// / gs:// URI with credentials")) from None
