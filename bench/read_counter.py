"""Counting the bytes read from ``.parquet`` files through ``inflora_ray.storage`` (used by
``bench/read_amplification.py`` and ``tests/test_data_blocks.py``): every read's size is appended to the file
named by ``$INFLORA_READ_LOG``, from this process and from any process that calls :func:`install`."""
from __future__ import annotations

import os

LOG_ENV = "INFLORA_READ_LOG"


def _log_read(n: int) -> None:
    fd = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{n}\n".encode())
    finally:
        os.close(fd)


class _CountingFile:
    """A file object that logs the size of each read (wrapped in pyarrow.PythonFile)."""

    def __init__(self, f):
        self._f = f

    def read(self, n=-1):
        data = self._f.read(n) if n is not None and n >= 0 else self._f.read()
        _log_read(len(data))
        return data

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()

    @property
    def closed(self):
        return self._f.closed

    def readable(self):
        return True

    def seekable(self):
        return True


class _CountingFS:
    """A pyarrow filesystem whose .parquet input files log every byte read."""

    def __init__(self, fs):
        self._fs = fs

    def open_input_file(self, path):
        import pyarrow as pa

        f = self._fs.open_input_file(path)
        return pa.PythonFile(_CountingFile(f), mode="r") if path.endswith(".parquet") else f

    def __getattr__(self, name):
        return getattr(self._fs, name)


def counting_filesystem(plain):
    """``inflora_ray.storage.filesystem`` wrapped: the bytes read from .parquet files go to ``$INFLORA_READ_LOG``."""
    def filesystem(path):
        fs, p = plain(path)
        return _CountingFS(fs), p
    return filesystem


def install(worker_id: int = 0) -> None:
    """Count this process's reads from the store (also usable as a DataLoader ``worker_init_fn``)."""
    from inflora_ray import storage

    storage.filesystem = counting_filesystem(storage.filesystem)


def bytes_logged(path) -> int:
    """The bytes counted in the read log ``path`` (0 when nothing was read)."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(int(line) for line in f if line.strip())
