"""A worker's block of a task, read from the store once and kept on local disk for its loader processes.

Each Ray Train worker reads only its block of a task (:func:`inflora_ray.data.loader.block_bounds`), but it
reads it many times: every epoch, every covariance pass, in every loader process. From Parquet shards in an
object store each of those reads is a row-group request, so a task's bytes would cross the network about
(epochs x loader processes) times. :class:`BlockCache` reads a block once (each row group holding it once),
writes the block's encoded images to one local file, and hands out a :class:`StagedSource` that loader
processes read with ``pread``: from then on no byte of the block comes from the store.

The cache is bounded (``data.block_cache_mb`` of local disk per Ray worker; least recently staged blocks not in
use are removed first) and lives in a private folder (under ``data.block_cache_dir``, default the system's
temporary folder) that is removed when the worker's process exits. A block larger than the bound is not
staged: it is read from the store as before (row groups through the per-process LRU of
``data.shard_cache_mb``), with a warning.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from ..logs import log_event
from .base import decode_image
from .shards import repair_advice

log = logging.getLogger(__name__)


class StagedSource:
    """The samples of one block held in a local file: ``load(i)`` for ``i`` in the block (other indices raise
    KeyError). ``labels`` are the whole split's (labels are looked up by dataset index).

    Picklable (a path and small arrays); each process opens the file itself, on first use.
    """

    def __init__(self, path: str, indices: np.ndarray, offsets: np.ndarray, formats: list[str],
                 labels: np.ndarray, origin: str, advice: str = ""):
        self.path = path
        self.indices = indices  # sorted dataset indices of the block
        self.offsets = offsets  # int64, len(indices) + 1: sample k is bytes [offsets[k], offsets[k + 1])
        self.formats = formats
        self.labels = labels
        self.origin = origin  # where the bytes came from (error messages)
        self.advice = advice  # what to do about a sample that does not decode (a command to run)
        self._fd: Optional[int] = None
        self._pid = -1

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes of encoded images in the block file."""
        return int(self.offsets[-1])

    def _position(self, index: int) -> int:
        k = int(np.searchsorted(self.indices, index))
        if k >= len(self.indices) or int(self.indices[k]) != index:
            raise KeyError(f"sample {index} is not in this worker's staged block of {self.origin}")
        return k

    def holds(self, index: int) -> bool:
        """True if sample ``index`` is in this block."""
        k = int(np.searchsorted(self.indices, index))
        return k < len(self.indices) and int(self.indices[k]) == index

    def encoded(self, index: int) -> tuple[bytes, str]:
        """(encoded image bytes, format) of sample ``index``, read from the local block file."""
        k = self._position(int(index))
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self.offsets[k]), int(self.offsets[k + 1])
        data = os.pread(self._fd, end - start, start)
        if len(data) != end - start:
            raise OSError(f"local block file {self.path} is shorter than written (sample {index} of {self.origin})")
        return data, self.formats[k]

    def load(self, index: int) -> torch.Tensor:
        """Sample ``index`` decoded: uint8 RGB (3, H, W)."""
        data, _ = self.encoded(index)
        return decode_image(data, f"(sample {index}) staged from {self.origin}", self.advice)

    def close(self) -> None:
        """Close this process's handle of the block file (reopened on next use)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class BlockSet:
    """Several blocks of one split as one source (one loader for an evaluation over every seen task): a
    sample comes from the staged block holding it, else from the first source that is not staged (a block
    too large to stage, read from the store)."""

    def __init__(self, sources: list):
        self.sources = sources
        self.labels = sources[0].labels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        """Sample ``index`` decoded, from the block holding it."""
        for source in self.sources:
            if not isinstance(source, StagedSource) or source.holds(index):
                return source.load(index)
        raise KeyError(f"sample {index} is in none of this worker's blocks")


def _remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


class BlockCache:
    """Staged blocks on local disk, at most ``max_bytes`` in all (0: never stage), in a private folder under
    ``root`` (None: the system's temporary folder) removed when the process exits or the cache is dropped."""

    def __init__(self, root: Optional[str] = None, max_bytes: int = 32 << 30):
        self.root = root
        self.max_bytes = int(max_bytes)
        self._folder: Optional[str] = None
        self._blocks: OrderedDict[str, int] = OrderedDict()  # block key -> bytes, least recently staged first
        self._described: dict[str, dict] = {}  # block key -> the StagedSource's arguments
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> StagedSource in use
        self._cleanup = None
        self.store_reads = 0  # blocks read from the store (diagnostics, tests)

    @property
    def folder(self) -> str:
        """The cache's private folder (created on first use)."""
        if self._folder is None:
            if self.root is not None:
                os.makedirs(self.root, exist_ok=True)
            self._folder = tempfile.mkdtemp(prefix=f"inflora-blocks-{os.getpid()}-", dir=self.root)
            self._cleanup = weakref.finalize(self, _remove, self._folder)
            atexit.register(self._cleanup)
        return self._folder

    @property
    def used_bytes(self) -> int:
        return sum(self._blocks.values())

    def close(self) -> None:
        """Remove every staged block and the folder."""
        if self._cleanup is not None:
            self._cleanup()
        self._folder, self._cleanup = None, None
        self._blocks.clear()
        self._described.clear()

    def _evict(self, need: int) -> bool:
        """Remove least recently staged blocks not in use until ``need`` more bytes fit; False if they cannot."""
        for key in list(self._blocks):
            if self.used_bytes + need <= self.max_bytes:
                break
            if key in self._live:
                continue
            os.unlink(os.path.join(self.folder, key))
            del self._blocks[key], self._described[key]
        return self.used_bytes + need <= self.max_bytes

    def stage(self, source, indices):
        """``source`` restricted to ``indices`` as a :class:`StagedSource` read from local disk, after reading
        each row group holding them once from the store; ``source`` itself when it has no row groups to read
        (files on local disk, tensors in memory), when staging is off, or when the block cannot fit."""
        if self.max_bytes <= 0 or not hasattr(source, "read_rows") or len(indices) == 0:
            return source
        idx = np.unique(np.asarray(indices, dtype=np.int64))
        h = hashlib.sha256(f"{source.uri}\0{source.split}\0".encode())
        h.update(idx.tobytes())
        key = h.hexdigest()[:32]
        if key in self._live:
            self._blocks.move_to_end(key)
            return self._live[key]
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._open(key)
        estimate = source.estimated_bytes(idx)
        if not self._evict(estimate):
            log_event(log, "block_not_staged", level=logging.WARNING, source=source.uri, split=source.split,
                      samples=len(idx), estimated_mb=round(estimate / 2**20, 1),
                      cache_mb=round(self.max_bytes / 2**20, 1),
                      message="the block does not fit in data.block_cache_mb: it is read from the store row "
                              "group by row group, in every loader process; raise data.block_cache_mb or use "
                              "more Ray workers")
            return source
        return self._write(key, idx, source)

    def _write(self, key: str, idx: np.ndarray, source) -> StagedSource:
        path = os.path.join(self.folder, key)
        tmp = f"{path}.part"
        offsets, formats = [0], []
        try:
            with open(tmp, "wb") as out:
                for _, data, fmt in source.read_rows(idx):
                    out.write(data)
                    offsets.append(offsets[-1] + len(data))
                    formats.append(fmt)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.store_reads += 1
        self._blocks[key] = offsets[-1]
        self._described[key] = dict(path=path, indices=idx, offsets=np.asarray(offsets, dtype=np.int64),
                                    formats=formats, labels=source.labels, origin=f"{source.uri} ({source.split})",
                                    advice=repair_advice(source.uri))
        staged = self._open(key)
        self._evict(0)  # the estimate may have been short: stay within the bound if blocks not in use allow
        log_event(log, "block_staged", source=source.uri, split=source.split, samples=len(idx),
                  mb=round(offsets[-1] / 2**20, 2), cache_mb=round(self.used_bytes / 2**20, 1))
        return staged

    def _open(self, key: str) -> StagedSource:
        """A StagedSource of block ``key`` (marked in use while the object lives)."""
        staged = StagedSource(**self._described[key])
        self._live[key] = staged
        return staged
