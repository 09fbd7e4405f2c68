"""Hostile and damaged data, one table row each: crafted CIFAR-100 pickles, altered release files, damaged
Parquet shards and manifests, broken images, links and special files in a source folder, decompression
bombs, relative paths.

Each row says what the input is, how to build it under ``tmp_path``, and which exception (with which message
fragment) the operation that meets it raises: building the benchmark (the driver, before Ray starts),
``inflora-data prepare``, or reading a sample (a worker). A row without an exception checks the returned
value instead. Around every operation a ``sys.audit`` hook records the files opened for writing, the files and
folders created, moved or removed, and the processes started; afterwards the test checks that none of them
was outside ``tmp_path``, that no process started, that the file a crafted pickle would create does not
exist, and that ``out`` (where the refused ``prepare`` commands write) does not exist: no shard file and no
folder was left behind. (Files written by pyarrow's C++ code are not audited; the check of ``out`` covers
the shard writer.)
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shlex
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_data import bench, write_cifar, write_domainnet, write_imagenet_r

from inflora_ray.config import DataConfig
from inflora_ray.data import DataError, build_benchmark, cifar100, shard_writer, shards
from inflora_ray.data.__main__ import main as data_cli
from inflora_ray.data.shard_writer import prepare_shards

MARKER = "code-ran"  # the file a crafted pickle creates if it runs
SHARD = "train/task-000/part-00000.parquet"
WNID = "n01443537"  # the first class folder of the ImageNet-R fixture


# ------------------------------------------------------------------------------------------ crafted pickles
class _System:
    """Unpickled, calls ``os.system(command)``: the classic crafted pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Exec:
    """Unpickled, calls ``exec(code)``."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _touch_marker(tmp):
    return _System(f"touch {shlex.quote(str(tmp / MARKER))}")


def _exec_marker(tmp):
    return _Exec(f"open({str(tmp / MARKER)!r}, 'w').close()")


def _repickle(path, edit) -> None:
    """Rewrite the CIFAR pickle at ``path`` with ``edit(dict)`` applied (protocol 2, like the release)."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    edit(d)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def _cifar_with(tmp, split: str, payload) -> str:
    """A CIFAR-100 fixture whose ``split`` file ("meta", "train") also holds ``payload``; returns data.root."""
    root = write_cifar(tmp / "cifar")
    _repickle(root / "cifar-100-python" / split, lambda d: d.update({b"payload": payload}))
    return str(root)


def _as_official(mp, root: str, *names: str) -> None:
    """Pretend ``names`` of the fixture at ``root`` are the official release's files (their MD5 is made official)."""
    for n in names:
        with open(os.path.join(root, "cifar-100-python", n), "rb") as f:
            mp.setitem(cifar100.OFFICIAL_MD5, n, hashlib.md5(f.read()).hexdigest())


def _cifar_bench(root: str, **kw):
    return lambda: build_benchmark(DataConfig(benchmark="cifar100", root=root, num_tasks=10, **kw), 32)


def _cli(*args: str) -> str:
    """Run ``inflora-data`` with ``args``; its exit code and stderr in one string."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = data_cli(list(args))
    return f"exit {code}: {err.getvalue()}"


def crafted_meta_verified(tmp, mp):
    root = _cifar_with(tmp, "meta", _touch_marker(tmp))
    _as_official(mp, root, "train", "test")  # an official copy whose meta was replaced
    return _cifar_bench(root)


def crafted_meta_unverified(tmp, mp):
    return _cifar_bench(_cifar_with(tmp, "meta", _touch_marker(tmp)), verify_release=False)


def crafted_meta_exec(tmp, mp):
    return _cifar_bench(_cifar_with(tmp, "meta", _exec_marker(tmp)), verify_release=False)


def crafted_train_unverified(tmp, mp):
    return _cifar_bench(_cifar_with(tmp, "train", _exec_marker(tmp)), verify_release=False)


def crafted_meta_prepare(tmp, mp):
    root = _cifar_with(tmp, "meta", _touch_marker(tmp))
    return lambda: _cli("prepare", "cifar100", "--source", root, "--out", str(tmp / "out"), "--no-verify-release")


def cifar_altered_train(tmp, mp):
    root = write_cifar(tmp / "cifar")
    _as_official(mp, str(root), "test", "meta")
    return _cifar_bench(str(root))


def cifar_changed_after_build(tmp, mp):
    """The driver read one train file, a worker finds another (changed since, or another node's copy)."""
    root = write_cifar(tmp / "cifar")
    b = bench("cifar100", root, num_tasks=10)
    worker = pickle.loads(pickle.dumps(b.train))
    _repickle(root / "cifar-100-python" / "train", lambda d: d[b"data"].__setitem__((0, 0), 255 - d[b"data"][0, 0]))
    return lambda: worker.load(0)


# ------------------------------------------------------------------------------------------ shards
def _shards(tmp):
    """Shards of the ImageNet-R fixture at tmp/shards (rows_per_group 4, 3 task folders)."""
    prepare_shards("imagenet-r", str(write_imagenet_r(tmp / "imagenet-r")), str(tmp / "shards"), rows_per_group=4,
                   num_tasks=3)
    return tmp / "shards"


def _read_all(shards, **kw):
    """Build from ``shards`` (the driver), then read every sample (what the workers do)."""
    def run():
        b = bench("imagenet-r", num_tasks=3, shards=str(shards), **kw)
        for src in (b.train, b.test):
            for i in range(len(src)):
                src.load(i)
    return run


def _flip_same_size(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _first_image_offset(shards) -> int:
    """Where the second half of the first image lies inside the shard file SHARD (stored uncompressed, once)."""
    b = bench("imagenet-r", num_tasks=3, shards=str(shards))
    image = b.train.encoded(0)[0]
    data, tail = (shards / SHARD).read_bytes(), image[len(image) // 2:]
    assert data.count(tail) == 1
    return data.index(tail)


def shard_footer_damaged(tmp, mp):
    shards = _shards(tmp)
    _flip_same_size(shards / SHARD, (shards / SHARD).stat().st_size - 20)
    return _read_all(shards)


def shard_image_bytes_damaged(tmp, mp):
    shards = _shards(tmp)
    _flip_same_size(shards / SHARD, _first_image_offset(shards))
    return _read_all(shards)


def shard_damaged_verify_hashes(tmp, mp):
    shards = _shards(tmp)
    _flip_same_size(shards / SHARD, _first_image_offset(shards))
    return _read_all(shards, verify_hashes=True)


def _edit_manifest(tmp, edit):
    """Shards whose manifest.json is replaced by ``edit(manifest dict)`` (bytes or a dict to write as JSON)."""
    shards = _shards(tmp)
    new = edit(json.loads((shards / "manifest.json").read_text()))
    (shards / "manifest.json").write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())
    return _read_all(shards)


def manifest_without_splits(tmp, mp):
    return _edit_manifest(tmp, lambda m: {k: v for k, v in m.items() if k != "splits"})


def manifest_not_json(tmp, mp):
    return _edit_manifest(tmp, lambda m: b"{'format': 'inflora-ray-shards'")


def manifest_other_format(tmp, mp):
    return _edit_manifest(tmp, lambda m: dict(m, format="other-tool"))


def manifest_other_version(tmp, mp):
    return _edit_manifest(tmp, lambda m: dict(m, format_version=2))


def manifest_path_outside(tmp, mp):
    def edit(m):
        m["splits"]["train"]["files"][0]["path"] = "../../outside.parquet"
        return m
    return _edit_manifest(tmp, edit)


def shard_file_missing(tmp, mp):
    shards = _shards(tmp)
    (shards / SHARD).unlink()
    return _read_all(shards)


# ------------------------------------------------------------------------------------------ image folders
def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def imagenet_r_truncated(tmp, mp):
    root = write_imagenet_r(tmp / "imagenet-r")
    _truncate(root / "n01443537" / "cartoon_1.jpg")

    def run():
        b = bench("imagenet-r", root, num_tasks=3)
        for i in range(len(b.train)):
            b.train.load(i)
    return run


def _with_split_manifest(tmp):
    """The ImageNet-R fixture at tmp/imagenet-r and its split manifest at tmp/split.json."""
    root = write_imagenet_r(tmp / "imagenet-r")
    assert _cli("manifest", "imagenet-r", "--source", str(root), "--out", str(tmp / "split.json")).startswith("exit 0")
    return root


def imagenet_r_truncated_with_manifest(tmp, mp):
    root = _with_split_manifest(tmp)
    _truncate(root / "n01443537" / "cartoon_1.jpg")
    return lambda: bench("imagenet-r", root, num_tasks=3, manifest=str(tmp / "split.json"))


def split_manifest_path_outside(tmp, mp):
    root = _with_split_manifest(tmp)
    man = json.loads((tmp / "split.json").read_text())
    man["files"][0]["path"] = "../outside.jpg"
    (tmp / "split.json").write_text(json.dumps(man))
    return lambda: bench("imagenet-r", root, num_tasks=3, manifest=str(tmp / "split.json"))


def domainnet_missing_image_prepare(tmp, mp):
    """A listed image of the last class is missing: prepare fails after writing earlier files, and removes them."""
    root = write_domainnet(tmp / "domainnet")
    (root / "sketch" / "arm" / "sketch_009_000000.jpg").unlink()
    return lambda: prepare_shards("domainnet", str(root), str(tmp / "out"), rows_per_group=2, num_tasks=5)


# ------------------------------------------------------------------------------------------ hostile source files
def _prepare(tmp, benchmark: str, root, out: str = "out"):
    """The operation ``inflora-data prepare BENCHMARK --source root --out tmp/out --num-tasks 3`` (its exit code
    and stderr)."""
    return lambda: _cli("prepare", benchmark, "--source", str(root), "--out", str(tmp / out), "--num-tasks", "3")


def _imagenet_r(tmp, damage):
    """The ImageNet-R fixture at tmp/imagenet-r with ``damage(class folder n01443537)`` applied; the operation
    that prepares it into tmp/out."""
    root = write_imagenet_r(tmp / "imagenet-r")
    damage(root / WNID)
    return _prepare(tmp, "imagenet-r", root)


def _link(path, target) -> None:
    """Replace ``path`` by a symbolic link to ``target``."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.symlink_to(target)


def _png(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` black one-bit pixels, compressed row by row: 20000 x 20000 takes
    about 50 KB, and nothing of the decoded size is ever held in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bomb(width: int, height: int):
    """``damage``: put a ``width`` x ``height`` PNG (made in under 2 s) into the class folder as bomb.png."""
    def damage(folder):
        start = time.perf_counter()
        data = _png(width, height)
        assert time.perf_counter() - start < 2 and len(data) < 100_000
        (folder / "bomb.png").write_bytes(data)
    return damage


def imagenet_r_link_to_file_outside(tmp, mp):
    def damage(folder):
        (tmp / "secret.jpg").write_bytes((folder / "art_0.jpg").read_bytes())
        _link(folder / "art_0.jpg", tmp / "secret.jpg")
    return _imagenet_r(tmp, damage)


def imagenet_r_link_to_folder_outside(tmp, mp):
    def damage(folder):
        shutil.copytree(folder, tmp / "elsewhere")
        _link(folder, tmp / "elsewhere")
    return _imagenet_r(tmp, damage)


def imagenet_r_relative_link_outside(tmp, mp):
    def damage(folder):
        (tmp / "secret.jpg").write_bytes((folder / "art_0.jpg").read_bytes())
        _link(folder / "art_0.jpg", "../../secret.jpg")
    return _imagenet_r(tmp, damage)


def imagenet_r_link_inside(tmp, mp):
    """A link to another image of the same copy is read like the file it points to."""
    root = write_imagenet_r(tmp / "imagenet-r")
    _link(root / WNID / "art_0.jpg", "../n01484850/art_0.jpg")
    return _prepare(tmp, "imagenet-r", root, out="shards")


def domainnet_list_linked_outside(tmp, mp):
    """A published list replaced by a link: refused before it is read (its lines would be quoted in errors)."""
    root = write_domainnet(tmp / "domainnet")
    (tmp / "list.txt").write_bytes((root / "clipart_train.txt").read_bytes())
    _link(root / "clipart_train.txt", tmp / "list.txt")
    return _prepare(tmp, "domainnet", root)


@contextlib.contextmanager
def _reader_released(fifo):
    """While the block runs, whenever a reader has opened ``fifo``, open and close its writing end: the reader
    gets an empty file instead of blocking for ever (a check that fails makes its test fail, not hang)."""
    done = threading.Event()

    def release():
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader
                done.wait(0.05)
    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def domainnet_fifo_named_jpg(tmp, mp):
    """A FIFO where a listed image should be: reading it would block prepare for ever."""
    root = write_domainnet(tmp / "domainnet")
    image = root / "sketch" / "arm" / "sketch_009_000000.jpg"
    image.unlink()
    os.mkfifo(image)
    prepare = _prepare(tmp, "domainnet", root)

    def run():
        with _reader_released(image):
            return prepare()
    return run


def imagenet_r_zero_byte_jpeg(tmp, mp):
    return _imagenet_r(tmp, lambda folder: (folder / "cartoon_1.jpg").write_bytes(b""))


def imagenet_r_truncated_prepare(tmp, mp):
    return _imagenet_r(tmp, lambda folder: _truncate(folder / "cartoon_1.jpg"))


def imagenet_r_eps_named_jpg(tmp, mp):
    """PostScript, which Pillow would hand to Ghostscript to decode, under an image's name."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
    return _imagenet_r(tmp, lambda folder: (folder / "cartoon_1.jpg").write_bytes(eps))


def _shard_formats(folder) -> dict[str, str]:
    """key -> format of every row of the shards in ``folder``."""
    formats = {}
    for f in sorted(folder.rglob("*.parquet")):
        t = pq.read_table(f, columns=["key", "format"]).to_pydict()
        formats.update(zip(t["key"], t["format"]))
    return formats


def imagenet_r_png_named_jpg(tmp, mp):
    """A PNG under a .jpg name is kept (renaming it would change the ImageNet-R split), as format png."""
    root = write_imagenet_r(tmp / "imagenet-r")
    (root / WNID / "cartoon_1.jpg").write_bytes(_png(30, 20))

    def run():
        prepared = _prepare(tmp, "imagenet-r", root, out="shards")().split(":")[0]
        formats = _shard_formats(tmp / "shards")
        verified = _cli("verify", str(tmp / "shards")).split(":")[0]
        return f"{prepared}; {formats[f'{WNID}/cartoon_1.jpg']}, {formats[f'{WNID}/art_0.jpg']}; {verified}"
    return run


def imagenet_r_decompression_bomb(tmp, mp):
    return _imagenet_r(tmp, _bomb(20000, 20000))


def imagenet_r_over_the_pixel_limit(tmp, mp):
    """Above the limit but below Pillow's own error threshold (twice its warning threshold): refused by ours."""
    return _imagenet_r(tmp, _bomb(10000, 10000))


def domainnet_truncated_last_test_image(tmp, mp):
    """The last image written (the test split comes after every train file): the files and folders written
    before it are removed."""
    root = write_domainnet(tmp / "domainnet")
    _truncate(root / "sketch" / "arm" / "sketch_009_000002.jpg")
    return lambda: prepare_shards("domainnet", str(root), str(tmp / "out"), rows_per_group=2, num_tasks=5)


# ------------------------------------------------------------------------------------------ images in shards
def _unchecked_shards(tmp, damage, name: str = "shards"):
    """Shards of the ImageNet-R fixture with ``damage(class folder)`` applied, written with the image check
    bypassed (as an older prepare wrote them); their folder."""
    root = write_imagenet_r(tmp / "imagenet-r")
    damage(root / WNID)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(shard_writer, "check_image", lambda data, where, fix: "jpeg")
        prepare_shards("imagenet-r", str(root), str(tmp / name), rows_per_group=4, num_tasks=3)
    return tmp / name


def verify_truncated_image_in_shards(tmp, mp):
    folder = _unchecked_shards(tmp, lambda f: _truncate(f / "cartoon_1.jpg"))
    return lambda: _cli("verify", str(folder))


def verify_bomb_in_shards(tmp, mp):
    folder = _unchecked_shards(tmp, _bomb(20000, 20000))
    return lambda: _cli("verify", str(folder))


def verify_sizes_only(tmp, mp):
    """``verify --no-hashes`` checks sizes only: it does not decode (and passes)."""
    folder = _unchecked_shards(tmp, lambda f: _truncate(f / "cartoon_1.jpg"))
    return lambda: _cli("verify", str(folder), "--no-hashes")


def _first_error(sources) -> str:
    """The message of the first DataError met reading every sample of ``sources`` (what the workers do)."""
    for src in sources:
        for i in range(len(src)):
            try:
                src.load(i)
            except DataError as e:
                return str(e)
    raise AssertionError("every sample decoded")


def worker_advice_is_a_command(tmp, mp):
    """A worker that cannot decode a sample says what to run; that command (the folder's name has a space)
    runs, and names the image."""
    folder = _unchecked_shards(tmp, lambda f: _truncate(f / "cartoon_1.jpg"), name="my shards")

    def run():
        b = bench("imagenet-r", num_tasks=3, shards=str(folder))
        message = _first_error((b.train, b.test))
        argv = shlex.split(re.search(r"run `([^`]+)` to see which files are affected", message).group(1))
        assert argv[:2] == ["inflora-data", "verify"], argv
        return _cli(*argv[1:])
    return run


# ------------------------------------------------------------------------------------------ relative paths
def relative_shards(tmp, mp):
    """data.shards=shards given in tmp; a worker in another working directory reads the same shards."""
    _shards(tmp)
    mp.chdir(tmp)
    cfg = DataConfig(benchmark="imagenet-r", shards="shards", num_tasks=3)

    def run():
        mp.chdir(tmp / "cwd")
        assert build_benchmark(cfg, 32).test.load(0).shape[0] == 3
        return cfg.shards
    return run


def home_relative_root(tmp, mp):
    write_imagenet_r(tmp / "home" / "imagenet-r")
    return lambda: DataConfig(benchmark="imagenet-r", root="~/imagenet-r", num_tasks=3).root


# ------------------------------------------------------------------------------------------ the table
# (what, build(tmp_path, monkeypatch) -> the operation, exception or None, message fragment: a regex; TMP
# stands for tmp_path)
REDO = r"; run `inflora-data verify \S+` to see which files are affected, then prepare the shards again"
CASES = [
    ("crafted CIFAR meta pickle, MD5 check on (default)", crafted_meta_verified, DataError,
     (r"not the official CIFAR-100 python release: \S+/meta has MD5 [0-9a-f]{32}, the official release's is "
      r"7973b15100ade9c7d40fb424638fde48\. .*set data\.verify_release=false \(inflora-data prepare: "
      r"--no-verify-release\)")),
    ("crafted CIFAR meta pickle (os.system), data.verify_release=false", crafted_meta_unverified, DataError,
     r"cifar-100-python/meta: refused to load global (posix|nt)\.system"),
    ("crafted CIFAR meta pickle (exec), data.verify_release=false", crafted_meta_exec, DataError,
     r"cifar-100-python/meta: refused to load global (__builtin__|builtins)\.exec"),
    ("crafted CIFAR train pickle (exec), data.verify_release=false", crafted_train_unverified, DataError,
     r"cifar-100-python/train: refused to load global (__builtin__|builtins)\.exec"),
    ("crafted CIFAR meta pickle, inflora-data prepare --no-verify-release", crafted_meta_prepare, None,
     r"^exit 2: error: \S+/meta: refused to load global (posix|nt)\.system"),
    ("CIFAR train file with another MD5", cifar_altered_train, DataError,
     (r"release: \S+/train has MD5 [0-9a-f]{32}, the official release's is 16019d7e3df5f24257cddd939b257f8d\. "
      r"The copy is altered")),
    ("CIFAR train file changed after the benchmark was built (worker)", cifar_changed_after_build, DataError,
     (r"cifar-100-python/train: MD5 [0-9a-f]{32} differs from [0-9a-f]{32} of the file read when the benchmark "
      r"was built")),
    ("shard file of the right size, damaged footer (worker)", shard_footer_damaged, DataError,
     rf"shard file \S+/{SHARD} is damaged \(\w+: .*\){REDO}"),
    ("shard file of the right size, damaged image bytes (worker)", shard_image_bytes_damaged, DataError,
     rf"shard file \S+/{SHARD} is damaged \(row group 0: .*\){REDO}"),
    ("shard file of the right size, damaged, data.verify_hashes=true (driver)", shard_damaged_verify_hashes,
     DataError, rf"sha256 differs for 1 file\(s\) \(e\.g\. {SHARD}\){REDO}"),
    ("shard manifest without splits", manifest_without_splits, DataError,
     rf"manifest\.json: 'splits' is missing or does not map \['train', 'test'\] to their files; .*{REDO}"),
    ("shard manifest not JSON", manifest_not_json, DataError, rf"manifest\.json: not JSON \(JSONDecodeError: .*{REDO}"),
    ("shard manifest of another format", manifest_other_format, DataError,
     (r"manifest\.json: format 'other-tool', not an inflora-ray shard manifest \(format 'inflora-ray-shards'\); "
      r"point data\.shards at a folder written by `inflora-data prepare`")),
    ("shard manifest of another format version", manifest_other_version, DataError,
     r"manifest\.json: shard format version 2, this code reads 1; prepare the shards again"),
    ("shard manifest naming a file outside the shards", manifest_path_outside, DataError,
     r"splits\.train\.files\[0\]\.path '\.\./\.\./outside\.parquet' is not 'train/task-TTT/part-KKKKK\.parquet'"),
    ("shard file missing (driver)", shard_file_missing, DataError,
     rf"1 shard file\(s\) do not match the manifest \({SHARD} missing\){REDO}"),
    ("truncated image in an ImageNet-R folder (worker)", imagenet_r_truncated, DataError,
     (r"cannot decode image \S+/imagenet-r/n01443537/cartoon_1\.jpg \(OSError: .*\); the file is damaged or "
      r"truncated: restore it")),
    ("truncated image in an ImageNet-R folder with a split manifest (driver)", imagenet_r_truncated_with_manifest,
     DataError, r"1 altered \(e\.g\. n01443537/cartoon_1\.jpg \(size \d+, manifest \d+\)\)"),
    ("ImageNet-R split manifest naming a file outside data.root", split_manifest_path_outside, DataError,
     r"split\.json': files\[0\] must have path '<wnid>/<file>', .*'path': '\.\./outside\.jpg'.*; regenerate it"),
    ("DomainNet list names a missing image (prepare)", domainnet_missing_image_prepare, DataError,
     r"image file missing: \S+/sketch/arm/sketch_009_000000\.jpg"),
    ("link to a file outside --source (prepare)", imagenet_r_link_to_file_outside, None,
     (rf"^exit 2: error: TMP/imagenet-r/{WNID}/art_0\.jpg: a symbolic link to \S+/secret\.jpg, outside --source "
      r"TMP/imagenet-r; prepare reads nothing outside the source folder")),
    ("link to a class folder outside --source (prepare)", imagenet_r_link_to_folder_outside, None,
     rf"^exit 2: error: TMP/imagenet-r/{WNID}: a symbolic link to \S+/elsewhere, outside --source"),
    ("relative link leading outside --source (prepare)", imagenet_r_relative_link_outside, None,
     rf"^exit 2: error: TMP/imagenet-r/{WNID}/art_0\.jpg: a symbolic link to \S+/secret\.jpg, outside"),
    ("link that stays inside --source (prepare)", imagenet_r_link_inside, None, r"^exit 0: "),
    ("DomainNet list linked outside --source (prepare)", domainnet_list_linked_outside, None,
     r"^exit 2: error: TMP/domainnet/clipart_train\.txt: a symbolic link to \S+/list\.txt, outside --source"),
    ("FIFO named like a listed image (prepare)", domainnet_fifo_named_jpg, None,
     r"^exit 2: error: TMP/domainnet/sketch/arm/sketch_009_000000\.jpg: not a regular file, folder or link"),
    ("zero-byte JPEG (prepare)", imagenet_r_zero_byte_jpeg, None,
     (rf"^exit 2: error: TMP/imagenet-r/{WNID}/cartoon_1\.jpg: an empty file \(0 bytes\), not an image; "
      r"restore it from the dataset's release")),
    ("truncated JPEG (prepare)", imagenet_r_truncated_prepare, None,
     rf"^exit 2: error: TMP/imagenet-r/{WNID}/cartoon_1\.jpg: does not decode \(OSError: .*\); restore it"),
    ("PostScript named .jpg (prepare; Pillow would run Ghostscript)", imagenet_r_eps_named_jpg, None,
     (rf"^exit 2: error: TMP/imagenet-r/{WNID}/cartoon_1\.jpg: not an image in one of the formats JPEG, PNG, "
      r"GIF, BMP, WEBP \(\d+ bytes\)")),
    ("PNG named .jpg (prepare: kept, its true format recorded; verify)", imagenet_r_png_named_jpg, None,
     r"^exit 0; png, jpeg; exit 0$"),
    ("decompression bomb: 20000 x 20000 PNG of 50 KB (prepare)", imagenet_r_decompression_bomb, None,
     (rf"^exit 2: error: TMP/imagenet-r/{WNID}/bomb\.png: 400000000 pixels, more than the limit of 89478485 "
      r"\(a decompression bomb\?\); restore it from the dataset's release")),
    ("10000 x 10000 PNG: over the pixel limit, under Pillow's error threshold (prepare)",
     imagenet_r_over_the_pixel_limit, None,
     (rf"^exit 2: error: TMP/imagenet-r/{WNID}/bomb\.png: 10000 x 10000 = 100000000 pixels, more than the "
      r"limit of 89478485")),
    ("truncated image found after files were written (prepare removes them)", domainnet_truncated_last_test_image,
     DataError, r"TMP/domainnet/sketch/arm/sketch_009_000002\.jpg: does not decode \(OSError: "),
    ("verify: shards holding a truncated image", verify_truncated_image_in_shards, None,
     (r"^exit 2: error: data\.shards='TMP/shards': 1 image\(s\) fail the image check \(e\.g\. "
      rf"\w+/task-000/part-00000\.parquet row \d+ \(key '{WNID}/cartoon_1\.jpg'\): does not decode \(OSError: "
      r".* prepare the shards again with `inflora-data prepare BENCHMARK --source PATH --out TMP/shards "
      r"--overwrite`")),
    ("verify: shards holding a decompression bomb", verify_bomb_in_shards, None,
     (r"^exit 2: error: data\.shards='TMP/shards': 1 image\(s\) fail the image check \(e\.g\. "
      rf"\S+ row \d+ \(key '{WNID}/bomb\.png'\): 400000000 pixels, more than the limit of 89478485")),
    ("verify --no-hashes: sizes only, no image decoded", verify_sizes_only, None, r"^exit 0: $"),
    ("the command a worker advises for an undecodable shard image", worker_advice_is_a_command, None,
     (r"^exit 2: error: data\.shards='TMP/my shards': 1 image\(s\) fail the image check \(e\.g\. \S+ row \d+ "
      rf"\(key '{WNID}/cartoon_1\.jpg'\): does not decode")),
    ("relative data.shards (made absolute, read from another working directory)", relative_shards, None,
     r"^TMP/shards$"),
    ("data.root under ~ (expanded)", home_relative_root, None, r"^TMP/home/imagenet-r$"),
]


# ------------------------------------------------------------------------------------------ the recorder
_SPAWNS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen"}
_CHANGES = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate", "os.symlink", "os.link",
            "os.chmod", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_recording: list[list[tuple[str, str]]] = []  # the events of the operation running now (a hook stays forever)


def _hook(event: str, args: tuple) -> None:
    """The audit hook: note writes (with their absolute paths) and process starts while recording."""
    if not _recording:
        return
    paths = [os.path.abspath(os.fsdecode(a)) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    if event == "open" and isinstance(args[2], int) and args[2] & _WRITE_FLAGS:
        _recording[-1] += [("write", p) for p in paths[:1]]
    elif event in _CHANGES:
        _recording[-1] += [("write", p) for p in paths]
    elif event in _SPAWNS:
        _recording[-1].append(("spawn", f"{event} {args!r:.200}"))


sys.addaudithook(_hook)


@contextlib.contextmanager
def _record():
    """Record the writes and process starts of the block; yields the list they are appended to."""
    events: list[tuple[str, str]] = []
    _recording.append(events)
    try:
        yield events
    finally:
        _recording.pop()


def _inside(path: str, folder) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


@pytest.mark.parametrize("what,build,error,fragment", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(what, build, error, fragment, tmp_path, monkeypatch):
    for sub in ("cwd", "tmp", "home"):
        (tmp_path / sub).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # relative writes would land in tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # prepare's local staging folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # imports during the operation write no .pyc
    operation = build(tmp_path, monkeypatch)
    fragment = fragment.replace("TMP", re.escape(str(tmp_path)))
    with _record() as events:
        if error is None:
            assert re.search(fragment, str(operation())), what
        else:
            with pytest.raises(error, match=fragment):
                operation()
    assert not (tmp_path / MARKER).exists(), f"{what}: code from the data ran"
    assert not [e for e in events if e[0] == "spawn"], f"{what}: started a process: {events}"
    outside = [p for kind, p in events if kind == "write" and not _inside(p, tmp_path)]
    assert not outside, f"{what}: wrote outside tmp_path: {outside}"
    out = tmp_path / "out"
    assert not out.exists(), f"{what}: left {[str(p) for p in out.rglob('*')]} in {out}"


def test_the_recorder_sees_what_it_must_refuse(tmp_path):
    """The checks above could fail: the recorder notes a write outside tmp_path and a process start, and
    unpickling the crafted payload with plain pickle does create the marker."""
    outside = tempfile.mkdtemp(prefix="inflora-hostile-")
    try:
        with _record() as events:
            open(os.path.join(outside, "x"), "w").close()
            pickle.loads(pickle.dumps(_touch_marker(tmp_path), protocol=2))
        assert ("write", os.path.join(outside, "x")) in events
        assert any(kind == "spawn" and "os.system" in e for kind, e in events)
        assert (tmp_path / MARKER).exists()
    finally:
        os.remove(os.path.join(outside, "x"))
        os.rmdir(outside)


def test_pixel_limit_is_inclusive_and_photos_pass(monkeypatch):
    """The pixel limit: a 6000 x 4000 JPEG (a 24-megapixel camera's photo) passes; an image of exactly the
    limit passes and one more pixel is refused (the limit lowered to keep the images small); a camera's MPO
    file (a JPEG with more pictures appended) is recorded as jpeg."""
    from PIL import Image

    def encoded(image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()

    assert shards.check_image(encoded(Image.new("RGB", (6000, 4000)), "JPEG"), "photo", "") == "jpeg"
    mpo = encoded(Image.new("RGB", (64, 48)), "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))])
    assert shards.check_image(mpo, "mpo", "") == "jpeg"
    monkeypatch.setattr(shards, "MAX_IMAGE_PIXELS", 30 * 20)
    assert shards.check_image(_png(30, 20), "at the limit", "") == "png"
    with pytest.raises(DataError, match=r"^one more: 601 x 1 = 601 pixels, more than the limit of 600 .*; fix$"):
        shards.check_image(_png(601, 1), "one more", "fix")
    assert np.asarray(Image.open(io.BytesIO(_png(30, 20)))).shape == (20, 30)  # the test's PNGs are valid
