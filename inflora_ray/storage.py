"""Run storage on a local path or an object store (s3://, gs://, ...) through pyarrow's filesystems.

Writes are atomic where the filesystem allows it (write a temporary name, then move), so a reader never
sees a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs


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


def _s3_with_endpoint(endpoint: str) -> pafs.S3FileSystem:
    scheme, sep, host = endpoint.partition("://")
    if not sep or scheme not in ("http", "https") or not host:
        raise OSError(f"S3 endpoint {endpoint!r} (from {'/'.join(ENDPOINT_VARS)}): expected http(s)://host[:port]")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # Path-style addressing (the default with an endpoint override): bucket names need no DNS entries.
    return pafs.S3FileSystem(endpoint_override=host.rstrip("/"), scheme=scheme, region=region)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``path`` and the path inside it; ``s3://`` paths go to the endpoint in
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` when one is set."""
    if path.startswith("s3://") and s3_endpoint() is not None:
        return _s3_with_endpoint(s3_endpoint()), path[len("s3://"):].split("?", 1)[0]
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def ray_storage(path: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: an ``s3://`` path on a store given by
    ``AWS_ENDPOINT_URL[_S3]`` becomes the path inside an S3 filesystem with that endpoint (Ray resolves URIs
    with pyarrow, which ignores those variables); anything else is left to Ray."""
    if path.startswith("s3://") and s3_endpoint() is not None:
        return filesystem(path)[1], filesystem(path)[0]
    return absolute(path), None


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest (``hashlib`` algorithm name) of the bytes of ``path`` (local or URI), read in 4 MiB chunks."""
    h = hashlib.new(algorithm)
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + move), creating parent directories. A failed
    write (a full disk, a lost connection) leaves no temporary file and raises ``OSError`` naming ``path``."""
    fs, p = filesystem(path)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, p)
    except Exception as e:  # pyarrow raises OSError and ArrowInvalid variants
        try:
            fs.delete_file(tmp)
        except Exception:  # noqa: S110 (never written, or the store is gone: nothing more to do)
            pass
        raise OSError(getattr(e, "errno", None), f"cannot write {path} ({type(e).__name__}: {e})") from e


def delete(path: str) -> None:
    """Delete the file ``path`` if it is there (a local path or a URI)."""
    fs, p = filesystem(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass


def read_bytes(path: str) -> bytes:
    """The contents of ``path``."""
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def read_json(path: str):
    return json.loads(read_bytes(path))


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def list_names(path: str) -> list[str]:
    """Names directly under directory ``path`` (empty if it does not exist)."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p)))


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
        raise OSError(f"storage path {path!r} is not writable ({type(e).__name__}: {e}); "
                      "give a writable local directory, NFS path, or s3:// / gs:// URI with credentials") from None
