"""Writing Parquet shards: ``inflora-data prepare`` converts a raw benchmark into the layout that
:mod:`inflora_ray.data.shards` describes and reads (written to a local folder first, then published)."""
from __future__ import annotations

import datetime
import os
import posixpath
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import storage
from .base import DataError, FileSource, label_sorted_order, split_tasks
from .raw import load_raw_sources
from .registry import get_benchmark
from .shards import (DEFAULT_ROWS_PER_FILE, DEFAULT_ROWS_PER_GROUP, FORMAT, FORMAT_VERSION, MANIFEST, SCHEMA, SPLITS,
                     COLUMN_COMPRESSION, check_image, shard_path)

# What to do about a source file that prepare refuses.
_RESTORE = "restore it from the dataset's release"


def _inside(path: str, root: str) -> bool:
    """True if ``path`` is ``root`` or below it (both resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_entry(entry: os.DirEntry, root: str, source: str) -> bool:
    """One entry below ``source`` (resolved: ``root``): True for a folder to walk into; a DataError for a link
    that leads outside and for anything but a regular file, a folder or a link."""
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if not _inside(target, root):
            raise DataError(f"{entry.path}: a symbolic link to {target}, outside --source {source}; prepare reads "
                            "nothing outside the source folder: replace the link by a copy of what it points to")
        return False  # its target is inside, and walked there
    if entry.is_dir(follow_symlinks=False):
        return True
    if not entry.is_file(follow_symlinks=False):
        raise DataError(f"{entry.path}: not a regular file, folder or link (a FIFO, socket or device: reading "
                        "it could block or never end); remove it from the source folder")
    return False


def check_source_tree(source: str) -> None:
    """Refuse, before anything is read, what ``prepare`` must not read below the folder ``source``: a symbolic
    link (to a file or a folder) whose target resolves outside ``source``, and entries that are not regular
    files, folders or links. Links that stay inside are allowed (what they point to is checked where it is).
    Walks the whole tree without following links; a ``source`` that is not a folder is left to the loader."""
    source = os.path.expanduser(source)
    root = os.path.realpath(source)
    folders = [source] if os.path.isdir(source) else []
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"{folder}: cannot list the folder ({type(e).__name__}: {e}); check its "
                            "permissions") from None
        folders += [e.path for e in entries if _check_entry(e, root, source)]


def _sample_name(src, split: str, index: int) -> str:
    """Where sample ``index`` of ``src`` comes from, for messages: its file, or its key in the release."""
    if isinstance(src, FileSource):
        return os.path.join(src.root, *src.key(index).split("/"))
    key = src.key(index) if hasattr(src, "key") else str(index)
    return f"{getattr(src, 'path', split)} (sample {key})"


def checked_encoded(src, split: str, index: int) -> tuple[bytes, str]:
    """(encoded bytes, format found by decoding them) of sample ``index`` of ``src``, after
    :func:`~inflora_ray.data.shards.check_image`: a DataError names the sample's file and why it is refused."""
    data, _ = src.encoded(index)
    return data, check_image(data, _sample_name(src, split, index), _RESTORE)


def _rle(labels: np.ndarray) -> list[list[int]]:
    out: list[list[int]] = []
    for lab in labels.tolist():
        if out and out[-1][0] == lab:
            out[-1][1] += 1
        else:
            out.append([int(lab), 1])
    return out


def _make_folder(dest: str) -> list[str]:
    """Create the folder of the file ``dest`` (local path or URI) with its missing parents; return the
    folders it created (their paths in the filesystem), deepest first."""
    fs, p = storage.filesystem(dest)
    parent = posixpath.dirname(p) if storage.is_uri(dest) else os.path.dirname(p)
    created, folder = [], parent
    while folder and fs.get_file_info(folder).type == pafs.FileType.NotFound:
        created.append(folder)
        up = posixpath.dirname(folder) if storage.is_uri(dest) else os.path.dirname(folder)
        folder = "" if up == folder else up
    if created:
        fs.create_dir(parent, recursive=True)
    return created


def _publish(local: str, dest: str) -> None:
    """Move a finished local file to ``dest`` (local path or URI; its folder exists), streaming it for object
    stores."""
    if storage.is_uri(dest):
        fs, p = storage.filesystem(dest)
        with open(local, "rb") as src, fs.open_output_stream(p) as out:
            for chunk in iter(lambda: src.read(1 << 23), b""):
                out.write(chunk)
        os.remove(local)
    else:
        shutil.move(local, dest)


def _remove_if_empty(fs: pafs.FileSystem, folder: str) -> None:
    """Delete ``folder`` if nothing is in it (a failure to delete is ignored: it was only a folder)."""
    try:
        if not fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            fs.delete_dir(folder)
    except (OSError, pa.ArrowException):
        pass


def _class_chunks(labels: np.ndarray, positions: np.ndarray, rows_per_group: int) -> list[np.ndarray]:
    """``positions`` (consecutive, one task) cut at every label change and every ``rows_per_group`` rows."""
    chunks = []
    if len(positions) == 0:
        return chunks
    labs = labels[positions]
    cuts = np.flatnonzero(labs[1:] != labs[:-1]) + 1
    for block in np.split(positions, cuts):
        chunks += [block[s:s + rows_per_group] for s in range(0, len(block), rows_per_group)]
    return chunks


def _pack_files(chunks: list[np.ndarray], rows_per_file: int) -> list[list[np.ndarray]]:
    """Consecutive row groups (``chunks``) packed into files of at most ``rows_per_file`` rows."""
    files: list[list[np.ndarray]] = []
    for c in chunks:
        if not files or sum(map(len, files[-1])) + len(c) > rows_per_file:
            files.append([])
        files[-1].append(c)
    return files


class _ShardWriter:
    """Writes the Parquet files of a benchmark's splits under ``out``, each first to a local temporary folder.

    A context manager: the encoding threads and the temporary folder live as long as the ``with`` block; if the
    block fails, the files already published under ``out`` are deleted again, and the folders it created with
    them (no half-written shards). Every image is decoded before it is written (:func:`checked_encoded`).
    """

    def __init__(self, out: str, rows_per_group: int, rows_per_file: int, threads: int,
                 log: Callable[[str], None]):
        self.out, self.rows_per_group, self.rows_per_file = out, rows_per_group, rows_per_file
        self.threads, self.log = threads, log

    def __enter__(self) -> "_ShardWriter":
        self.tmpdir = tempfile.mkdtemp(prefix="inflora-shards-")
        self.pool = ThreadPoolExecutor(max(1, self.threads))
        self.published: list[str] = []
        self.created: list[str] = []  # folders made for the published files (filesystem paths)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.pool.shutdown()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if exc_type is not None:
            self._remove_written()

    def _remove_written(self) -> None:
        """Delete the files published so far and the folders made for them (after a failure: the error that
        caused it is the one raised; a file that cannot be deleted is logged)."""
        fs, _ = storage.filesystem(self.out)
        for dest in self.published:
            try:
                fs.delete_file(storage.filesystem(dest)[1])
            except (OSError, pa.ArrowException) as e:
                self.log(f"could not remove {dest} ({type(e).__name__}: {e}); delete it by hand")
        for folder in sorted(self.created, key=len, reverse=True):
            _remove_if_empty(fs, folder)

    def write_split(self, split: str, src, task_of: np.ndarray, num_tasks: int) -> dict:
        """Write every file of ``split`` (one directory per natural-order task); return its manifest entry."""
        labels = np.asarray(src.labels, dtype=np.int64)
        order = label_sorted_order(labels)  # identity for our label-ordered sources
        row_task = task_of[labels[order]]
        files = []
        for t in range(num_tasks):
            positions = np.flatnonzero(row_task == t)  # rows (positions in `order`) of natural task t
            chunks = _class_chunks(labels[order], positions, self.rows_per_group)
            for k, file_chunks in enumerate(_pack_files(chunks, self.rows_per_file)):
                files.append(self._write_file(split, src, labels, order, t, k, file_chunks))
        return {"num_rows": int(len(labels)), "files": files,
                "identity_order": bool(np.array_equal(order, np.arange(len(order))))}

    def _write_file(self, split: str, src, labels: np.ndarray, order: np.ndarray, task: int, part: int,
                    file_chunks: list[np.ndarray]) -> dict:
        """Write one file (a row group per chunk of positions in ``order``), publish it, return its entry."""
        rel = f"{split}/task-{task:03d}/part-{part:05d}.parquet"
        local = os.path.join(self.tmpdir, f"{split}-{task}-{part}.parquet")
        # Page checksums let a reader notice damaged bytes in the row groups it reads (without a full sha256).
        # No min/max statistics of the image column: they would copy two whole images into every page header
        # and into the footer that every reader fetches.
        with pq.ParquetWriter(local, SCHEMA, compression=COLUMN_COMPRESSION, use_dictionary=["format", "split"],
                              write_page_checksum=True,
                              write_statistics=[n for n in SCHEMA.names if n != "image"]) as writer:
            for chunk in file_chunks:
                idx = order[chunk]
                writer.write_table(self._table(split, src, labels, idx, task), row_group_size=len(idx))
        meta = pq.ParquetFile(local).metadata
        row_groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        rows = np.concatenate(file_chunks)
        entry = {"path": rel, "task": task, "num_rows": int(len(rows)), "row_groups": row_groups,
                 "labels": _rle(labels[order[rows]]), "size": os.path.getsize(local),
                 "sha256": storage.file_digest(local)}
        if sum(row_groups) != entry["num_rows"]:
            raise RuntimeError(f"{rel}: row groups {row_groups} do not add up to {entry['num_rows']}")
        dest = shard_path(self.out, rel)
        self.created += _make_folder(dest)
        _publish(local, dest)
        self.published.append(dest)
        self.log(f"{split} task {task}: {rel} ({entry['num_rows']} rows, {len(row_groups)} row groups, "
                 f"{entry['size'] / 1e6:.1f} MB)")
        return entry

    def _table(self, split: str, src, labels: np.ndarray, idx: np.ndarray, task: int) -> pa.Table:
        """The rows ``idx`` of ``src``: encoded images (read and decoded by the threads) and their columns."""
        enc = list(self.pool.map(lambda i: checked_encoded(src, split, i), idx.tolist()))
        keys = [src.key(int(i)) for i in idx] if hasattr(src, "key") else [str(i) for i in idx]
        return pa.table({
            "image": pa.array([e[0] for e in enc], pa.binary()),
            "format": pa.array([e[1] for e in enc], pa.string()),
            "label": pa.array(labels[idx], pa.int64()),
            "split": pa.array([split] * len(idx), pa.string()),
            "task": pa.array(np.full(len(idx), task, dtype=np.int32), pa.int32()),
            "index": pa.array(idx.astype(np.int64), pa.int64()),
            "key": pa.array(keys, pa.string()),
        }, schema=SCHEMA)


def _remove_shards(out: str) -> None:
    """Delete the split directories and the manifest of shards already at ``out``."""
    fs, _ = storage.filesystem(out)
    for split in SPLITS:
        sub = storage.join(out, split)
        if storage.exists(sub):
            fs.delete_dir(storage.filesystem(sub)[1])
    manifest_path = storage.join(out, MANIFEST)
    if storage.exists(manifest_path):
        fs.delete_file(storage.filesystem(manifest_path)[1])


def prepare_shards(benchmark: str, source: str, out: str, rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
                   rows_per_file: int = DEFAULT_ROWS_PER_FILE, num_tasks: Optional[int] = None,
                   overwrite: bool = False, download: bool = False, split_manifest: Optional[str] = None,
                   verify_hashes: bool = False, verify_release: bool = True, threads: int = 1,
                   log: Optional[Callable[[str], None]] = None) -> dict:
    """Convert the raw benchmark at ``source`` into Parquet shards under ``out``; return the manifest.

    ``num_tasks`` task directories in natural class order (default: the benchmark's paper task count);
    ``download``, ``split_manifest``, ``verify_hashes`` and ``verify_release`` are passed to the raw loader
    (:func:`inflora_ray.data.raw.load_raw_sources`). The source tree is checked for links that lead outside it
    before anything is read (:func:`check_source_tree`), and every image is decoded before it is written
    (:func:`checked_encoded`). Nothing is written before the source has been listed and checked, and a failure
    while writing (a refused image among them) deletes the files and folders already written.
    """
    log = log or (lambda s: None)
    if rows_per_group < 1 or rows_per_file < rows_per_group:
        raise ValueError(f"need 1 <= rows_per_group ({rows_per_group}) <= rows_per_file ({rows_per_file})")
    manifest_path = storage.join(out, MANIFEST)
    if storage.exists(manifest_path) and not overwrite:
        raise DataError(f"{out} already holds prepared shards ({MANIFEST}); pass --overwrite to replace them")
    check_source_tree(source)
    train, test, names, provenance = load_raw_sources(benchmark, source, download=download, manifest=split_manifest,
                                                      verify_hashes=verify_hashes, verify_release=verify_release)
    num_tasks = num_tasks or get_benchmark(benchmark).default_num_tasks
    if not 1 <= num_tasks <= len(names):
        raise DataError(f"--num-tasks {num_tasks}: must be between 1 and the {len(names)} classes of {source} "
                        f"(the default is the paper's {get_benchmark(benchmark).default_num_tasks} tasks)")
    tasks = split_tasks(list(range(len(names))), num_tasks)
    task_of = np.empty(len(names), dtype=np.int32)
    for t, classes in enumerate(tasks):
        task_of[classes] = t
    if storage.exists(out) and overwrite:
        _remove_shards(out)
    with _ShardWriter(out, rows_per_group, rows_per_file, threads, log) as writer:
        splits_out = {split: writer.write_split(split, src, task_of, num_tasks)
                      for split, src in zip(SPLITS, (train, test))}
        manifest = _manifest(benchmark, names, num_tasks, tasks, rows_per_group, rows_per_file, provenance,
                             splits_out)
        storage.write_json(manifest_path, manifest)  # last, and inside: a failed write removes the files
    log(f"wrote {manifest_path}: {splits_out['train']['num_rows']} train + {splits_out['test']['num_rows']} "
        f"test rows, {len(names)} classes")
    return manifest


def _manifest(benchmark: str, names: list, num_tasks: int, tasks: list, rows_per_group: int, rows_per_file: int,
              provenance: dict, splits_out: dict) -> dict:
    """The shards' manifest.json (see :mod:`inflora_ray.data.shards`)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "benchmark": benchmark,
        "num_classes": len(names), "class_names": list(names),
        "task_directories": {"num_tasks": num_tasks, "class_order": "natural", "tasks": tasks},
        "rows_per_group": rows_per_group, "rows_per_file": rows_per_file,
        "source_manifest": provenance, "splits": splits_out,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pyarrow": pa.__version__,
    }
