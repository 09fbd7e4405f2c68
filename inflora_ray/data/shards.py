"""Parquet shards of a benchmark: written once by ``inflora-data prepare`` (:mod:`.shard_writer`),
read lazily by workers.

Layout under ``OUT`` (a local path or an ``s3://`` / ``gs://`` URI, through pyarrow's filesystems)::

    OUT/manifest.json                          written last: counts, class names, per-file checksums
    OUT/<split>/task-<TTT>/part-<KKKKK>.parquet one directory per split and task (natural class order)

Rows follow the source's sample order, which is by label (each class one contiguous block), so the rows of
a split, files taken in (task, part) order, are exactly the source's indices 0..N-1, and a run reads the
same sample at the same index from the shards as from the raw folder. Every row group holds rows of one
class only (at most ``rows_per_group``), so for *any* class order a task's samples are whole row groups and a
worker's contiguous block of a task touches only the row groups that hold it (plus, at most, one partial
group at each end). Columns: ``image`` (encoded bytes: PNG for CIFAR's arrays, the original file's bytes
for the folder datasets, stored uncompressed), ``format`` (the image's format as found by decoding it, not
its file name's extension), ``label`` (original class id), ``split``, ``task`` (natural-order task of the
directory), ``index`` (position in the source split), ``key`` (source file or index). Every image was
decoded once by ``prepare`` before it was written (:func:`check_image`: :data:`IMAGE_FORMATS`, at most
:data:`MAX_IMAGE_PIXELS` pixels), and :func:`verify_shards` decodes them all again.

The manifest carries each file's row count, row-group sizes, labels (run-length) size and sha256, so a
reader knows every sample's label and location without opening any file; :class:`ParquetSource` opens a
file only when asked for one of its rows and reads only the row group holding it (LRU cache of encoded
bytes per row group, per process). Training does not read samples one by one from here: each worker stages
its block of a task once with :meth:`ParquetSource.read_rows` (:mod:`.blocks`) and its loader processes read
the staged copy.

Reading goes through :func:`inflora_ray.storage.retrying`: a file is opened, and every byte range of it read,
again after an error that passes (a lost connection, throttling, an expired token); when the retries are spent
a :class:`~inflora_ray.storage.TransientStorageError` is raised, which a run retries as a whole (from its last
checkpoint, ``run.max_failures``). pyarrow decodes a file through :class:`_StoreFile`, so an error raised while
decoding (a page checksum, the footer, a row count, a schema) is the file's content: damage, a
:class:`DataError` that no retry or restart can fix; so is a missing file or a refused permission.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from .. import storage
from .base import DataError, decode_image

FORMAT = "inflora-ray-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
DEFAULT_ROWS_PER_GROUP = 256
DEFAULT_ROWS_PER_FILE = 4096
DEFAULT_CACHE_BYTES = 1 << 30

SCHEMA = pa.schema([("image", pa.binary()), ("format", pa.string()), ("label", pa.int64()),
                    ("split", pa.string()), ("task", pa.int32()), ("index", pa.int64()), ("key", pa.string())])
COLUMN_COMPRESSION = {"image": "NONE", "format": "SNAPPY", "label": "SNAPPY", "split": "SNAPPY", "task": "SNAPPY",
                "index": "SNAPPY", "key": "SNAPPY"}

# The images that `prepare` writes and `verify` accepts: at most this many pixels (width x height). The value
# is Pillow's own default warning threshold (about 9459 x 9459, 268 MB decoded as RGB), set here explicitly so
# that no other library's setting changes it; a 20000 x 20000 image (a decompression bomb: 50 KB of PNG) is
# refused. And only these formats, decoded by Pillow itself: no format that Pillow hands to another program
# (EPS goes to Ghostscript), none of the rarely-photographic ones (TIFF, PSD, ...).
MAX_IMAGE_PIXELS = 89_478_485
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")


# Errors that pyarrow raises for unreadable or damaged files (ArrowInvalid is a ValueError, IO errors are OSErrors).
_READ_ERRORS = (OSError, ValueError, pa.ArrowException)


class _Unreadable(OSError):
    """A read of a shard file that the store refused for good (a permission, a file gone): raised by
    :class:`_StoreFile` so that the reader tells it from damage found while decoding."""


class _StoreFile:
    """A shard file opened on the store, as the Python file object that pyarrow decodes it through: every read
    is a read of a byte range of the store's file, made again after transient errors
    (:func:`storage.retrying`). An error that passes through pyarrow comes back out as raised here (a
    :class:`~inflora_ray.storage.TransientStorageError` or an :class:`_Unreadable`); any other error of a
    read is pyarrow's own, about the bytes it was given."""

    def __init__(self, handle, path: str):
        self._handle, self._path = handle, path
        self._size = handle.size()
        self._pos = 0
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, max(0, self._size - self._pos))
        try:
            data = storage.retrying("read", self._path, lambda: self._handle.read_at(n, self._pos))
        except storage.TransientStorageError:
            raise
        except Exception as e:  # the store refused the read for good
            raise _Unreadable(storage.describe_error(e)) from e
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
        self._handle.close()


def repair_advice(uri: str) -> str:
    """What to do about damaged or incomplete shards at ``uri``: two commands that can be pasted into a shell
    (``uri`` quoted), ``inflora-data verify`` to see which files are affected, then ``prepare`` again."""
    return (f"run `inflora-data verify {shlex.quote(uri)}` to see which files are affected, then prepare the "
            f"shards again with `{_prepare_again(uri)}`")


def _prepare_again(uri: str) -> str:
    """The command that writes the shards at ``uri`` again (the benchmark and source are the user's)."""
    return f"inflora-data prepare BENCHMARK --source PATH --out {shlex.quote(uri)} --overwrite"


def _too_large(pixels: str) -> str:
    """Why an image of ``pixels`` pixels is refused."""
    return f"{pixels} pixels, more than the limit of {MAX_IMAGE_PIXELS} (a decompression bomb?)"


def _image_problem(data: bytes) -> tuple[Optional[str], str]:
    """(why the image ``data`` is refused, or None; its format as the shards record it: "jpeg", "png", ...).

    The image is decoded in full and converted to RGB, as a worker will; refused: no bytes, not one of
    :data:`IMAGE_FORMATS`, more than :data:`MAX_IMAGE_PIXELS` pixels (checked before decoding), data that does
    not decode (truncated, damaged).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "an empty file (0 bytes), not an image", ""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                return _too_large(f"{width} x {height} = {width * height}"), ""
            im.convert("RGB")
            fmt = im.format
    except UnidentifiedImageError:
        return f"not an image in one of the formats {', '.join(IMAGE_FORMATS)} ({len(data)} bytes)", ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # over Pillow's own limit
        size = re.search(r"\((\d+) pixels\)", str(e))
        return _too_large(size.group(1) if size else "too many"), ""
    except Exception as e:  # noqa: BLE001  (Pillow raises several types: OSError, SyntaxError, ValueError, ...)
        return f"does not decode ({type(e).__name__}: {' '.join(str(e).split())})", ""
    return None, "jpeg" if fmt == "MPO" else fmt.lower()  # MPO: a JPEG with more pictures appended


def check_image(data: bytes, name: str, fix: str) -> str:
    """The format ("jpeg", "png", ...) of the encoded image ``data`` after decoding it in full, as a worker will.

    An image that ``prepare`` must not write (see :func:`_image_problem`) raises DataError naming ``name``
    (where the bytes came from) and why, and saying ``fix``.
    """
    problem, fmt = _image_problem(data)
    if problem is not None:
        raise DataError(f"{name}: {problem}; {fix}")
    return fmt


def shard_path(uri: str, rel: str) -> str:
    """The full path or URI of the shard file ``rel`` (a manifest path, '/'-separated) under ``uri``."""
    return storage.join(uri, *rel.split("/"))


def _un_rle(runs: list[list[int]]) -> np.ndarray:
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return np.repeat(np.asarray([r[0] for r in runs], dtype=np.int64), [int(r[1]) for r in runs])


class ParquetSource:
    """One split of prepared shards, read lazily: ``load(i)`` opens only the file and reads only the row group
    that hold row ``i`` (encoded bytes cached per row group, LRU, up to ``cache_bytes`` per process).

    Picklable: open files and the cache are per process and rebuilt after unpickling. ``opened_files`` and
    ``row_groups_read`` record this process's reads (diagnostics, tests).
    """

    def __init__(self, uri: str, split: str, files: list[dict], cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.uri = uri
        self.split = split
        self.paths = [f["path"] for f in files]
        self.sizes = [int(f["size"]) for f in files]
        self.file_offsets = np.cumsum([0] + [int(f["num_rows"]) for f in files])
        self.group_offsets = [np.cumsum([0] + [int(n) for n in f["row_groups"]]) for f in files]
        self.labels = (np.concatenate([_un_rle(f["labels"]) for f in files]) if files
                       else np.zeros(0, dtype=np.int64))
        if len(self.labels) != int(self.file_offsets[-1]):
            raise DataError(f"{uri}: manifest of split {split!r} is inconsistent (labels vs row counts)")
        self.cache_bytes = int(cache_bytes)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()  # open files are not shared with forked loader processes
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict = OrderedDict()
        self._cached = 0
        self.opened_files: set[str] = set()
        self.row_groups_read: list[tuple[str, int]] = []

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_pid", "_handles", "_cache", "_cached", "opened_files", "row_groups_read"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return len(self.labels)

    def locate(self, index: int) -> tuple[int, int, int]:
        """(file, row group, row within the group) of sample ``index``."""
        if not 0 <= index < len(self.labels):
            raise IndexError(f"sample {index} out of range for {len(self.labels)} rows")
        f = int(np.searchsorted(self.file_offsets, index, side="right")) - 1
        r = index - int(self.file_offsets[f])
        g = int(np.searchsorted(self.group_offsets[f], r, side="right")) - 1
        return f, g, r - int(self.group_offsets[f][g])

    def _damaged(self, f: int, problem: str) -> DataError:
        """The error for shard file ``f`` that cannot be read as the manifest describes it."""
        full = shard_path(self.uri, self.paths[f])
        return DataError(f"shard file {full} is damaged ({problem}); {repair_advice(self.uri)}")

    def _unreadable(self, f: int, e: Exception) -> DataError:
        """The error for shard file ``f`` that the store refused for good (missing, no permission)."""
        full = shard_path(self.uri, self.paths[f])
        why = str(e) if isinstance(e, _Unreadable) else storage.describe_error(e)  # an _Unreadable holds the store's error
        return DataError(f"shard file missing or unreadable: {full} ({why}); {repair_advice(self.uri)}")

    def _open(self, f: int) -> _StoreFile:
        """Shard file ``f`` opened for reading (transient errors retried), after checking its size against the
        manifest."""
        full = shard_path(self.uri, self.paths[f])

        def attempt():
            fs, p = storage.filesystem(full)
            return fs.open_input_file(p)

        try:
            handle = storage.retrying("open", full, attempt)
        except storage.TransientStorageError:
            raise
        except _READ_ERRORS as e:
            raise self._unreadable(f, e) from None
        size = handle.size()
        if size != self.sizes[f]:
            handle.close()
            raise self._damaged(f, f"{size} bytes, the manifest says {self.sizes[f]}: altered or partly copied")
        return _StoreFile(handle, full)

    def _file(self, f: int) -> pq.ParquetFile:
        """Shard file ``f`` as Parquet, opened once per process; checked against the manifest's size, row groups
        and the schema. Page checksums are verified on every read."""
        if f not in self._handles:
            handle = self._open(f)
            try:
                pf = pq.ParquetFile(pa.PythonFile(handle, mode="r"), page_checksum_verification=True)
            except (storage.TransientStorageError, _Unreadable) as e:
                handle.close()
                if isinstance(e, _Unreadable):
                    raise self._unreadable(f, e) from None
                raise
            except _READ_ERRORS as e:
                handle.close()
                raise self._damaged(f, storage.describe_error(e)) from None
            groups = len(self.group_offsets[f]) - 1
            if pf.metadata.num_row_groups != groups or not pf.schema_arrow.remove_metadata().equals(SCHEMA):
                raise self._damaged(f, f"{pf.metadata.num_row_groups} row groups and schema {pf.schema_arrow.names}, "
                                       f"the manifest says {groups} row groups of {SCHEMA.names}")
            self._handles[f] = pf
            self.opened_files.add(self.paths[f])
        return self._handles[f]

    def _read_group(self, f: int, g: int) -> tuple[list, list]:
        """(encoded images, formats) of row group ``g`` of file ``f``, read from the file and checked."""
        expected = int(self.group_offsets[f][g + 1] - self.group_offsets[f][g])
        pf = self._file(f)
        try:
            table = pf.read_row_group(g, columns=["image", "format"])
        except storage.TransientStorageError:
            raise
        except _Unreadable as e:
            raise self._unreadable(f, e) from None
        except _READ_ERRORS as e:  # raised while decoding the bytes read: a page checksum, a truncated page
            raise self._damaged(f, f"row group {g}: {storage.describe_error(e)}") from None
        if table.num_rows != expected or table.column("image").null_count or table.column("format").null_count:
            raise self._damaged(f, f"row group {g} holds {table.num_rows} rows "
                                   f"({table.column('image').null_count} without an image), the manifest says "
                                   f"{expected}")
        return table.column("image").to_pylist(), table.column("format").to_pylist()

    def _group(self, f: int, g: int) -> tuple[list, list]:
        if self._pid != os.getpid():
            self._reset()
        key = (f, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][0]
        images, formats = self._read_group(f, g)
        self.row_groups_read.append((self.paths[f], g))
        size = sum(len(b) for b in images)
        self._cache[key] = ((images, formats), size)
        self._cached += size
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, (_, s) = self._cache.popitem(last=False)
            self._cached -= s
        return images, formats

    def encoded(self, index: int) -> tuple[bytes, str]:
        """(encoded image bytes, format) of sample ``index``, read with its whole row group."""
        f, g, r = self.locate(int(index))
        images, formats = self._group(f, g)
        return images[r], formats[r]

    def load(self, index: int) -> torch.Tensor:
        """Sample ``index`` decoded: uint8 RGB (3, H, W)."""
        data, _ = self.encoded(index)
        full = shard_path(self.uri, self.paths[self.locate(index)[0]])
        return decode_image(data, f"(sample {index} of split {self.split!r}) in {full}", repair_advice(self.uri))

    def read_rows(self, indices):
        """Yield (index, encoded bytes, format) for each of ``indices`` in increasing order, reading every row
        group that holds them exactly once (not through the cache: a block is read once and kept elsewhere)."""
        if self._pid != os.getpid():
            self._reset()
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i in sorted({int(i) for i in indices}):
            f, g, r = self.locate(i)
            groups.setdefault((f, g), []).append((i, r))
        for (f, g), rows in groups.items():  # in index order: files and their groups follow the rows
            images, formats = self._read_group(f, g)
            self.row_groups_read.append((self.paths[f], g))
            for i, r in rows:
                yield i, images[r], formats[r]

    def estimated_bytes(self, indices) -> int:
        """About how many bytes of shard files ``indices`` take (each file's size spread over its rows)."""
        total = 0.0
        for i in indices:
            f = int(np.searchsorted(self.file_offsets, int(i), side="right")) - 1
            total += self.sizes[f] / max(1, int(self.file_offsets[f + 1] - self.file_offsets[f]))
        return int(total)

    def row_groups_of(self, indices) -> set[tuple[str, int]]:
        """The (file, row group) pairs holding ``indices`` (what a worker reading them must open)."""
        out = set()
        for i in indices:
            f, g, _ = self.locate(int(i))
            out.add((self.paths[f], g))
        return out


def read_shard_manifest(uri: str) -> tuple[dict, str]:
    """The manifest of prepared shards and its sha256; a DataError names the manifest and what is wrong."""
    path = storage.join(uri, MANIFEST)
    try:
        raw = storage.read_bytes(path)  # transient errors retried
    except storage.TransientStorageError:
        raise
    except _READ_ERRORS as e:
        raise DataError(f"data.shards={uri!r}: no {MANIFEST} there ({storage.describe_error(e)}); prepare shards "
                        "with `inflora-data prepare BENCHMARK --source PATH --out URI` and point data.shards at URI"
                        ) from None
    try:
        man = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: not JSON ({type(e).__name__}: {e}); {repair_advice(uri)}") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        found = f"format {man.get('format')!r}" if isinstance(man, dict) else f"a JSON {type(man).__name__}"
        raise DataError(f"{path}: {found}, not an inflora-ray shard manifest (format {FORMAT!r}); point "
                        "data.shards at a folder written by `inflora-data prepare` (the --out of that command)")
    if man.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: shard format version {man.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}; prepare the shards again with this version: `{_prepare_again(uri)}`")
    _check_layout(path, uri, man)
    return man, hashlib.sha256(raw).hexdigest()


# What the reader takes from each file entry of a manifest, with its type.
_ENTRY_FIELDS = {"path": str, "size": int, "num_rows": int, "row_groups": list, "labels": list, "sha256": str}


def _check_layout(path: str, uri: str, man: dict) -> None:
    """The keys, types and counts of a manifest that the reader relies on; a DataError names the first one
    that is missing or wrong."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DataError(f"{path}: {what}; the manifest is damaged or was not written by `inflora-data "
                            f"prepare`; {repair_advice(uri)}")

    need(isinstance(man.get("benchmark"), str), "'benchmark' is missing or not a string")
    need(isinstance(man.get("class_names"), list), "'class_names' is missing or not a list")
    splits = man.get("splits")
    need(isinstance(splits, dict) and all(isinstance(splits.get(s), dict) for s in SPLITS),
         f"'splits' is missing or does not map {list(SPLITS)} to their files")
    for split in SPLITS:
        files = splits[split].get("files")
        need(isinstance(files, list) and isinstance(splits[split].get("num_rows"), int),
             f"splits.{split} needs 'files' (a list) and 'num_rows' (an integer)")
        for k, entry in enumerate(files):
            _check_entry(need, f"splits.{split}.files[{k}]", split, entry)
        need(sum(e["num_rows"] for e in files) == splits[split]["num_rows"],
             f"splits.{split}: the files' num_rows do not add up to its num_rows {splits[split]['num_rows']}")


def _check_entry(need, where: str, split: str, entry) -> None:
    """One file entry of a manifest: its fields and types, a path inside the split's folder, consistent counts."""
    need(isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in _ENTRY_FIELDS.items()),
         f"{where} needs {', '.join(f'{k} ({t.__name__})' for k, t in _ENTRY_FIELDS.items())}")
    # Only names that prepare writes: a manifest must not make a reader open files outside the shards' folder.
    need(re.fullmatch(rf"{split}/task-\d+/part-\d+\.parquet", entry["path"]) is not None,
         f"{where}.path {entry['path']!r} is not '{split}/task-TTT/part-KKKKK.parquet'")
    groups, runs = entry["row_groups"], entry["labels"]
    need(all(isinstance(n, int) and n > 0 for n in groups) and sum(groups) == entry["num_rows"],
         f"{where}: row_groups {groups[:5]} must be positive and add up to num_rows {entry['num_rows']}")
    need(all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) and r[1] > 0 for r in runs)
         and sum(r[1] for r in runs) == entry["num_rows"],
         f"{where}: labels must be [label, count] runs adding up to num_rows {entry['num_rows']}")


def _check_files(uri: str, man: dict) -> None:
    """Every shard file exists with its manifest size (one metadata request per file, no reads)."""
    entries = [f for s in SPLITS for f in man["splits"][s]["files"]]
    if not entries:
        return
    def attempt():
        fs, _ = storage.filesystem(uri)
        return fs.get_file_info([storage.filesystem(shard_path(uri, e["path"]))[1] for e in entries])

    infos = storage.retrying("look up the shard files of", uri, attempt)
    bad = []
    for e, info in zip(entries, infos):
        if info.type == pafs.FileType.NotFound:
            bad.append(f"{e['path']} missing")
        elif info.size != e["size"]:
            bad.append(f"{e['path']} is {info.size} bytes, manifest {e['size']}")
    if bad:
        raise DataError(f"data.shards={uri!r}: {len(bad)} shard file(s) do not match the manifest "
                        f"({'; '.join(bad[:3])}); {repair_advice(uri)}")


def _check_hashes(uri: str, man: dict) -> None:
    """Every shard file's sha256 equals the manifest's (reads every file)."""
    bad = [e["path"] for s in SPLITS for e in man["splits"][s]["files"]
           if storage.file_digest(shard_path(uri, e["path"])) != e["sha256"]]
    if bad:
        raise _hashes_differ(uri, bad)


def _hashes_differ(uri: str, bad: list[str]) -> DataError:
    """The error for the shard files ``bad`` whose sha256 differs from the manifest's."""
    return DataError(f"data.shards={uri!r}: sha256 differs for {len(bad)} file(s) (e.g. {', '.join(bad[:3])}); "
                     f"{repair_advice(uri)}")


def load_shards(uri: str, benchmark: Optional[str] = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                verify_hashes: bool = False):
    """(train, test, class names, provenance) of prepared shards; checks benchmark, classes and file sizes
    (and every file's sha256 with ``verify_hashes``)."""
    man, digest = read_shard_manifest(uri)
    if benchmark is not None and man.get("benchmark") != benchmark:
        raise DataError(f"data.shards={uri!r} holds benchmark {man.get('benchmark')!r}, but data.benchmark is "
                        f"{benchmark!r}")
    names = list(man.get("class_names") or [])
    if not names or man.get("num_classes") != len(names):
        raise DataError(f"data.shards={uri!r}: manifest num_classes {man.get('num_classes')} does not match "
                        f"its {len(names)} class names; {repair_advice(uri)}")
    _check_files(uri, man)
    if verify_hashes:
        _check_hashes(uri, man)
    train, test = (ParquetSource(uri, s, man["splits"][s]["files"], cache_bytes) for s in SPLITS)
    for src in (train, test):
        if len(src) and (src.labels.min() < 0 or src.labels.max() >= len(names)):
            raise DataError(f"data.shards={uri!r}: labels outside 0..{len(names) - 1}; {repair_advice(uri)}")
    provenance = {
        "source": "parquet-shards", "uri": uri, "benchmark": man["benchmark"], "format_version": FORMAT_VERSION,
        "manifest_sha256": digest, "num_classes": len(names), "num_train": len(train), "num_test": len(test),
        "rows_per_group": man.get("rows_per_group"), "created": man.get("created"),
        "source_manifest": man.get("source_manifest"), "hashes_verified": bool(verify_hashes),
    }
    return train, test, names, provenance


def _rows(data: bytes):
    """Yield (row, image bytes, format, key) of every row of the shard file whose bytes are ``data``."""
    pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    row = 0
    for g in range(pf.metadata.num_row_groups):
        table = pf.read_row_group(g, columns=["image", "format", "key"])
        for image, fmt, key in zip(*(table.column(c).to_pylist() for c in ("image", "format", "key"))):
            yield row, image, fmt, key
            row += 1


def _row_problem(path: str, row: int, image, fmt, key) -> Optional[str]:
    """Why row ``row`` of the shard file ``path`` fails the image check, or None (see :func:`check_image`)."""
    problem, found = _image_problem(image or b"")
    if problem is None and found != fmt:
        problem = f"a {found} image, its row says {fmt!r}"
    return None if problem is None else f"{path} row {row} (key {key!r}): {problem}"


def _bad_images(path: str, data: bytes, pool: ThreadPoolExecutor) -> tuple[list[str], int]:
    """(the rows of the shard file ``path``, whose bytes are ``data``, that fail the image check; its rows)."""
    try:
        rows = list(_rows(data))
    except _READ_ERRORS as e:
        return [f"{path} cannot be read ({storage.describe_error(e)})"], 0
    return [p for p in pool.map(lambda r: _row_problem(path, *r), rows) if p is not None], len(rows)


def _check_contents(uri: str, man: dict, hashes: bool, threads: int) -> int:
    """Every image of every shard file decodes within :data:`MAX_IMAGE_PIXELS` and is of the format its row
    records; with ``hashes``, every file's sha256 equals the manifest's too. Each file is read once. Returns
    the number of images checked."""
    bad_hashes, bad_images, images = [], [], 0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for entry in (e for s in SPLITS for e in man["splits"][s]["files"]):
            data = storage.read_bytes(shard_path(uri, entry["path"]))
            if hashes and hashlib.sha256(data).hexdigest() != entry["sha256"]:
                bad_hashes.append(entry["path"])
                continue
            bad, rows = _bad_images(entry["path"], data, pool)
            bad_images, images = bad_images + bad, images + rows
    if bad_hashes:
        raise _hashes_differ(uri, bad_hashes)
    if bad_images:
        raise DataError(f"data.shards={uri!r}: {len(bad_images)} image(s) fail the image check (e.g. "
                        f"{'; '.join(bad_images[:3])}); the shards were written without it (by an older version "
                        "of prepare) or rewritten since: restore the source files named by the keys from the "
                        f"dataset's release and prepare the shards again with `{_prepare_again(uri)}`")
    return images


def verify_shards(uri: str, hashes: bool = True, images: Optional[bool] = None, threads: int = 4) -> dict:
    """Check every shard file against the manifest: its size; with ``hashes``, its sha256; with ``images``
    (default: as ``hashes``), that every image decodes within :data:`MAX_IMAGE_PIXELS` and is of the format
    its row records, as ``prepare`` checks it (in ``threads`` threads). Either reads every file once."""
    images = hashes if images is None else images
    man, digest = read_shard_manifest(uri)
    _check_files(uri, man)
    checked = 0
    if images:
        checked = _check_contents(uri, man, hashes, threads)
    elif hashes:
        _check_hashes(uri, man)
    return {"uri": uri, "benchmark": man["benchmark"], "manifest_sha256": digest, "hashes_checked": hashes,
            "images_checked": checked, "files": sum(len(man["splits"][s]["files"]) for s in SPLITS),
            "rows": {s: man["splits"][s]["num_rows"] for s in SPLITS}}
