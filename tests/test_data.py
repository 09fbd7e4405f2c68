"""Real benchmarks on tiny fixtures in each dataset's on-disk format: CIFAR-100 python pickles, the ImageNet-R
folder tree, DomainNet folders + file lists. Loading, task splits, the fixed ImageNet-R split and its
manifest, Parquet shards (round trip, per-worker reads), presets, preprocessing, and clear errors."""
from __future__ import annotations

import codecs
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from inflora_ray.data.registry import check_data_config
from inflora_ray.config import ConfigError, DataConfig
from inflora_ray.presets import load_config
from inflora_ray.data import DataError, Preprocess, build_benchmark, cifar100, paper_preprocess, resolve_normalization
from inflora_ray.data.__main__ import main as data_cli
from inflora_ray.data.imagenet_r import SPLIT_VERSION, split_class
from inflora_ray.data.loader import block_bounds
from inflora_ray.data.raw import load_raw_sources
from inflora_ray.data.shard_writer import prepare_shards
from inflora_ray.data.sample import (DN_CLASSES, DOMAINS, STYLES, WNIDS, write_cifar, write_domainnet,  # noqa: F401
                                     write_imagenet_r)
from inflora_ray.data.shards import ParquetSource, verify_shards
from inflora_ray.storage import file_digest

# The fixtures' writers are the package's own sample datasets (inflora-data sample); tests/test_hostile_data.py
# builds damaged copies from them.
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def imr_root(tmp_path_factory):
    return write_imagenet_r(tmp_path_factory.mktemp("imr") / "imagenet-r")


@pytest.fixture(scope="module")
def dn_root(tmp_path_factory):
    return write_domainnet(tmp_path_factory.mktemp("domainnet"))


def bench(benchmark, root=None, img_size=32, **kw):
    """The benchmark built from ``root`` (or shards in ``kw``); CIFAR fixtures skip the official-MD5 check."""
    if benchmark == "cifar100":
        kw.setdefault("verify_release", False)
    return build_benchmark(DataConfig(benchmark=benchmark, root=None if root is None else str(root), **kw), img_size)


# ------------------------------------------------------------------------------------------ raw sources
def test_cifar100_loads_in_release_format_and_splits_tasks(cifar_root):
    b = bench("cifar100", cifar_root, num_tasks=10)
    assert (len(b.train), len(b.test), b.num_classes) == (200, 100, 100)
    assert b.class_names[:2] == ["class_00", "class_01"] and b.manifest["official_release"] is False
    assert b.tasks == [list(range(10 * t, 10 * t + 10)) for t in range(10)]
    for t in range(10):
        idx = b.task_indices("train", t)
        assert len(idx) == 20 and set(b.train.labels[idx]) == set(b.tasks[t])
        assert np.array_equal(idx, np.arange(20 * t, 20 * t + 20))  # label-ordered: one block per task
    # pixels: channel-major rows of the pickle, at the release index recorded in key()
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    for i in (0, 57, 199):
        orig = int(b.train.key(i).split("/")[1])
        assert torch.equal(b.train.load(i), torch.from_numpy(raw[b"data"][orig].reshape(3, 32, 32)))
        assert b.train.labels[i] == raw[b"fine_labels"][orig]
    # lazy and picklable: the pixel array is not pickled, and is re-read on first use
    clone = pickle.loads(pickle.dumps(b.train))
    assert clone._data is None and torch.equal(clone.load(57), b.train.load(57))
    # the paper's CIFAR preprocessing: train RandomResizedCrop + flip, test Resize(img_size), inputs in [0, 1]
    assert b.preprocess.test_resize is None and b.preprocess.train_flip and b.preprocess.mean is None
    x = b.preprocess.train(b.train.load(0), torch.Generator().manual_seed(0))
    assert x.shape == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    # seeded class order: tasks follow it, task_indices select by class
    s = bench("cifar100", cifar_root, num_tasks=10, class_order_seed=1993)
    assert s.class_order == [int(c) for c in np.random.RandomState(1993).permutation(100)]
    assert set(s.train.labels[s.task_indices("train", 3)]) == set(s.class_order[30:40])


def test_cifar100_folder_itself_and_bad_roots(cifar_root, tmp_path):
    b = bench("cifar100", cifar_root / "cifar-100-python", num_tasks=10)
    assert len(b.train) == 200
    with pytest.raises(DataError, match=r"no CIFAR-100 python release there; expected .*cifar-100-python/"):
        bench("cifar100", tmp_path, num_tasks=10)
    bad = tmp_path / "cifar-100-python"
    bad.mkdir()
    for n in ("train", "test", "meta"):
        (bad / n).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-100 python pickle"):
        bench("cifar100", tmp_path, num_tasks=10)
    with pytest.raises(ConfigError, match=r"data.root: benchmark 'cifar100' needs data.root"):
        load_config("cifar100-10")
    with pytest.raises(ConfigError, match="data.root: path not found"):
        load_config("cifar100-10", [f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="data.download: only 'cifar100' can be downloaded"):
        load_config("imagenet-r-5", [f"data.root={tmp_path}", "data.download=true"])


def test_cifar100_release_md5_is_checked_by_default(cifar_root, tmp_path, monkeypatch, capsys):
    """By default every file must have the official release's MD5 before it is read; the fixtures cannot, so they
    are refused with the file, both digests and the opt-out, by the config path and by ``prepare``."""
    folder = cifar_root / "cifar-100-python"
    with pytest.raises(DataError, match=rf"not the official CIFAR-100 python release: {folder}/train has MD5 "
                                        r"[0-9a-f]{32}, the official release's is 16019d7e3df5f24257cddd939b257f8d; "
                                        rf"{folder}/test has MD5 .*set data.verify_release=false \(inflora-data "
                                        r"prepare: --no-verify-release\)"):
        build_benchmark(DataConfig(benchmark="cifar100", root=str(cifar_root), num_tasks=10), 32)
    assert data_cli(["prepare", "cifar100", "--source", str(cifar_root), "--out", str(tmp_path / "out")]) == 2
    assert "not the official CIFAR-100 python release" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # a copy with the official digests is read with the check on, and recorded as official
    for n in ("train", "test", "meta"):
        monkeypatch.setitem(cifar100.OFFICIAL_MD5, n, file_digest(str(folder / n), "md5"))
    b = build_benchmark(DataConfig(benchmark="cifar100", root=str(cifar_root), num_tasks=10), 32)
    assert b.manifest["official_release"] and b.manifest["release_verified"] and len(b.train) == 200
    assert not bench("cifar100", cifar_root, num_tasks=10).manifest["release_verified"]
    with pytest.raises(ConfigError, match="data.verify_release: false only applies to benchmark 'cifar100'"):
        check_data_config(DataConfig(benchmark="imagenet-r", root=str(tmp_path), verify_release=False))
    with pytest.raises(ConfigError, match="data.verify_release: false only applies to benchmark 'cifar100'"):
        build_benchmark(DataConfig(benchmark="imagenet-r", root=str(tmp_path), verify_release=False), 32)


def test_cifar100_unpickler_reads_data_and_numpy_arrays_only(tmp_path):
    """The restricted unpickler rebuilds arrays written by numpy 1 (the release's module names) and 2, and
    refuses every other global, even a harmless one, and _codecs.encode with another encoding than latin-1."""
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    # protocol 2 names globals as text: numpy 1's module name is written over numpy 2's
    numpy1 = pickle.dumps({b"data": arr}, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in numpy1
    for i, raw in enumerate((numpy1, pickle.dumps({b"data": arr}, protocol=2))):
        (tmp_path / f"ok{i}").write_bytes(raw)
        assert np.array_equal(cifar100._unpickle(str(tmp_path / f"ok{i}"))[b"data"], arr)
    (tmp_path / "set").write_bytes(pickle.dumps({b"x": {1, 2}}, protocol=2))
    with pytest.raises(DataError, match=r"set: refused to load global __builtin__.set: the CIFAR-100 python "
                                        r"release holds only"):
        cifar100._unpickle(str(tmp_path / "set"))

    class Rot13:
        def __reduce__(self):
            return codecs.encode, ("abc", "rot13")

    (tmp_path / "rot13").write_bytes(pickle.dumps({b"x": Rot13()}, protocol=2))
    with pytest.raises(DataError, match=r"rot13: not a CIFAR-100 python pickle \(UnpicklingError: "
                                        r"_codecs.encode\(str, 'rot13'\) is not latin-1 text"):
        cifar100._unpickle(str(tmp_path / "rot13"))
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DataError, match="list: expected a pickled dict, got list"):
        cifar100._unpickle(str(tmp_path / "list"))


def test_data_paths_are_stored_absolute(imr_root, tmp_path, monkeypatch):
    """Relative data.root / data.shards / data.manifest (and ~) become absolute when the config is validated, so
    workers with another working directory read the same files; URIs and data.manifest=packaged stay."""
    monkeypatch.chdir(imr_root.parent)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = DataConfig(benchmark="imagenet-r", root="imagenet-r", manifest="~/split.json", num_tasks=3)
    assert (cfg.root, cfg.manifest) == (str(imr_root), str(tmp_path / "split.json"))
    assert DataConfig(benchmark="imagenet-r", shards=".", num_tasks=3).shards == str(imr_root.parent)
    assert DataConfig(benchmark="imagenet-r", shards="s3://b/x", num_tasks=3).shards == "s3://b/x"
    assert DataConfig(benchmark="imagenet-r", root="imagenet-r", manifest="packaged").manifest == "packaged"
    assert DataConfig(**cfg.model_dump()) == cfg  # validating again changes nothing
    with pytest.raises(ConfigError, match="data.shards: must not be empty"):
        DataConfig(benchmark="imagenet-r", shards=" ")
    with pytest.raises(ConfigError, match="data.root: must not be empty"):
        DataConfig(benchmark="imagenet-r", root="")


# Pinned: the split rule imagenet-r-split-v1 on these file names. Same on every machine, forever; changing the
# rule must change SPLIT_VERSION (and this list).
PINNED_TEST_FILES = ["n01443537/art_0.jpg", "n01484850/art_0.jpg", "n01494475/graffiti_2.jpg",
                     "n01496331/art_0.jpg", "n01498041/cartoon_1.jpg", "n01514859/sketch_4.jpg"]


def test_imagenet_r_fixed_split_is_stable(imr_root):
    assert SPLIT_VERSION == "imagenet-r-split-v1"
    b = bench("imagenet-r", imr_root, num_tasks=3)
    assert b.class_names == WNIDS and (len(b.train), len(b.test)) == (24, 6)  # 80/20 of 5 per class
    assert b.test.paths == PINNED_TEST_FILES
    assert b.manifest["split_version"] == SPLIT_VERSION and b.manifest["split_source"] == "rule"
    # the rule depends only on relative paths (not on the folder's location, listing order or contents)
    names = [f"n01443537/{s}_{k}.jpg" for k, s in enumerate(STYLES)]
    assert split_class(names) == split_class(list(reversed(names)))
    assert sorted(split_class([f"n0/x_{i}.jpg" for i in range(10)]).values()).count("train") == 8
    assert b.tasks == [[0, 1], [2, 3], [4, 5]]
    assert set(b.train.labels[b.task_indices("train", 1)]) == {2, 3}
    img = b.train.load(0)
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    # ImageNet-R/DomainNet test view: Resize(256) + CenterCrop(224) at 224 px
    assert paper_preprocess("imagenet-r", 224).test_resize == 256
    assert b.preprocess.test(img).shape == (3, 32, 32)


def test_imagenet_r_manifest_detects_missing_and_altered_files(imr_root, tmp_path):
    copy = tmp_path / "imagenet-r"
    import shutil
    shutil.copytree(imr_root, copy)
    man_path = tmp_path / "split.json"
    assert data_cli(["manifest", "imagenet-r", "--source", str(copy), "--out", str(man_path)]) == 0
    man = json.loads(man_path.read_text())
    assert man["version"] == SPLIT_VERSION and man["num_files"] == 30
    assert {"path", "split", "label", "size", "sha256"} <= set(man["files"][0])
    ok = bench("imagenet-r", copy, num_tasks=3, manifest=str(man_path), verify_hashes=True)
    assert ok.test.paths == PINNED_TEST_FILES and ok.manifest["split_source"] == "manifest"
    # altered bytes, same size: caught by the sha256 check (optional), not by the size check
    victim = copy / "n01484850" / "art_0.jpg"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    bench("imagenet-r", copy, num_tasks=3, manifest=str(man_path))
    with pytest.raises(DataError, match=r"1 altered \(e.g. n01484850/art_0.jpg \(sha256 differs\)"):
        bench("imagenet-r", copy, num_tasks=3, manifest=str(man_path), verify_hashes=True)
    # altered size: always caught
    victim.write_bytes(bytes(data) + b"\0")
    with pytest.raises(DataError, match=r"altered \(e.g. n01484850/art_0.jpg \(size"):
        bench("imagenet-r", copy, num_tasks=3, manifest=str(man_path))
    # missing file
    (copy / "n01514859" / "sketch_4.jpg").unlink()
    with pytest.raises(DataError, match=r"1 missing \(e.g. n01514859/sketch_4.jpg\)"):
        bench("imagenet-r", copy, num_tasks=3, manifest=str(man_path))
    with pytest.raises(DataError, match="no packaged ImageNet-R split manifest yet"):
        bench("imagenet-r", copy, num_tasks=3, manifest="packaged")


def test_imagenet_r_wrong_layout_is_explained(imr_root, tmp_path):
    with pytest.raises(DataError, match=r"found .*imagenet-r: point data.root there"):
        bench("imagenet-r", imr_root.parent, num_tasks=3)
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError, match="wrong folder layout for ImageNet-R: expected class folders"):
        bench("imagenet-r", tmp_path, num_tasks=3)
    (tmp_path / "n01443537").mkdir()
    with pytest.raises(DataError, match="class folder n01443537/ holds no images"):
        bench("imagenet-r", tmp_path, num_tasks=1)


def test_domainnet_pools_all_domains_class_incrementally(dn_root, tmp_path):
    b = bench("domainnet", dn_root, num_tasks=5)
    assert b.class_names == DN_CLASSES and (len(b.train), len(b.test)) == (120, 60)
    assert b.tasks == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    idx = b.task_indices("train", 2)
    assert len(idx) == 24 and set(b.train.labels[idx]) == {4, 5}
    assert {b.train.paths[i].split("/")[0] for i in idx} == set(DOMAINS)  # every domain's images
    assert all(b.train.paths[i].split("/")[1] == DN_CLASSES[b.train.labels[i]] for i in range(len(b.train)))
    assert b.preprocess.test_resize == round(32 * 256 / 224)
    assert b.train.load(5).shape[:2] == (3, 12)
    assert b.manifest["per_domain"]["test"]["quickdraw"] == 10
    # wrong layout: a list missing
    (tmp_path / "clipart").mkdir()
    with pytest.raises(DataError, match=r"wrong folder layout for DomainNet: missing domain folders .*'infograph'"
                                        r".* and file lists \['clipart_train.txt'"):
        bench("domainnet", tmp_path, num_tasks=5)


def test_digits_quickstart_still_builds():
    b = build_benchmark(DataConfig(), 16)
    assert b.num_classes == 10 and b.train.load(0).shape == (3, 16, 16)
    with pytest.raises(ConfigError, match="data.shards: the digits quickstart"):
        load_config("quickstart", ["data.shards=/tmp"])


def test_registry_drives_preprocessing_and_raw_loading(tmp_path):
    """Each benchmark's crop, flip and test resize come from its registry entry; the registry imports no torch."""
    assert paper_preprocess("digits", 16) == Preprocess(img_size=16, train_scale=(0.7, 1.0), train_ratio=(0.9, 1.1),
                                                        train_flip=False)
    assert paper_preprocess("cifar100", 32) == Preprocess(img_size=32, train_scale=(0.08, 1.0),
                                                          train_ratio=(3 / 4, 4 / 3), train_flip=True)
    assert paper_preprocess("domainnet", 224).test_resize == 256
    with pytest.raises(ValueError, match=r"not available; available: \['digits', 'cifar100'"):
        paper_preprocess("mnist", 32)
    with pytest.raises(DataError, match="built in memory and has no release folder"):
        load_raw_sources("digits", str(tmp_path))
    code = "import sys, inflora_ray.data.registry; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# ------------------------------------------------------------------------------------------ Parquet shards
def _same_bytes(a, b, i):
    return a.encoded(i)[0] == b.encoded(i)[0]


@pytest.mark.parametrize("benchmark,num_tasks", [("cifar100", 10), ("imagenet-r", 3), ("domainnet", 5)])
def test_shards_round_trip_identical_samples(benchmark, num_tasks, cifar_root, imr_root, dn_root, tmp_path):
    root = {"cifar100": cifar_root, "imagenet-r": imr_root, "domainnet": dn_root}[benchmark]
    out = tmp_path / "shards"
    assert data_cli(["prepare", benchmark, "--source", str(root), "--out", str(out), "--rows-per-group", "4",
                     "--rows-per-file", "8", "--num-tasks", str(num_tasks), "--threads", "2",
                     "--no-verify-release"]) == 0  # ignored by the benchmarks without official checksums
    raw = bench(benchmark, root, num_tasks=num_tasks, class_order_seed=7)
    sh = bench(benchmark, num_tasks=num_tasks, class_order_seed=7, shards=str(out))
    assert sh.class_names == raw.class_names and sh.tasks == raw.tasks
    assert sh.manifest["source"] == "parquet-shards" and sh.manifest["source_manifest"]["source"] == benchmark
    assert sh.preprocess == raw.preprocess
    for split in ("train", "test"):
        a, b = getattr(raw, split), getattr(sh, split)
        assert isinstance(b, ParquetSource) and np.array_equal(a.labels, b.labels)
        for t in range(num_tasks):
            assert np.array_equal(raw.task_indices(split, t), sh.task_indices(split, t))
        for i in range(len(a)):
            if benchmark == "cifar100":
                assert torch.equal(a.load(i), b.load(i))  # PNG: decoded pixels equal
            else:
                assert _same_bytes(a, b, i)  # original JPEG bytes
                if i % 7 == 0:
                    assert torch.equal(a.load(i), b.load(i))
    man = json.loads((out / "manifest.json").read_text())
    assert man["splits"]["train"]["num_rows"] == len(raw.train) and man["num_classes"] == raw.num_classes
    assert os.path.isdir(out / "train" / "task-000") and verify_shards(str(out))["files"] >= 2 * num_tasks
    # row groups never mix classes and hold at most rows_per_group rows
    import pyarrow.parquet as pq
    for f in man["splits"]["train"]["files"]:
        pf = pq.ParquetFile(out / f["path"])
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["label", "split", "task"])
            assert len(set(t.column("label").to_pylist())) == 1 and t.num_rows <= 4
            assert set(t.column("split").to_pylist()) == {"train"} and set(t.column("task").to_pylist()) == {f["task"]}


def test_shards_two_workers_read_only_their_row_groups(imr_root, tmp_path):
    out = tmp_path / "shards"
    prepare_shards("imagenet-r", str(imr_root), str(out), rows_per_group=3, rows_per_file=6, num_tasks=3)
    # a shuffled class order: tasks are not the task directories, still whole row groups
    b = bench("imagenet-r", num_tasks=3, class_order_seed=1993, shards=str(out))
    assert b.tasks != [[0, 1], [2, 3], [4, 5]]
    for split in ("train", "test"):
        src = getattr(b, split)
        for t in range(3):
            idx = b.task_indices(split, t)
            seen = []
            for rank in range(2):
                worker = pickle.loads(pickle.dumps(src))  # what a Ray worker / loader process holds
                assert not worker.opened_files
                start, end = block_bounds(len(idx), rank, 2)
                block = idx[start:end]
                for i in block:
                    assert worker.encoded(int(i))[0] == src.encoded(int(i))[0]
                seen += block.tolist()
                mine = worker.row_groups_of(block)
                # only the row groups holding its block, each read once; only the files holding them
                assert sorted(worker.row_groups_read) == sorted(mine)
                assert worker.opened_files == {f for f, _ in mine}
                other = set(src.paths) - {f for f, _ in src.row_groups_of(idx)}
                assert not (worker.opened_files & other)
            assert sorted(seen) == idx.tolist()  # every sample exactly once
    # a tiny cache still reads correctly (evicting row groups)
    tiny = ParquetSource(str(out), "train", json.loads((out / "manifest.json").read_text())["splits"]["train"]["files"],
                         cache_bytes=1)
    assert all(tiny.encoded(i)[0] == b.train.encoded(i)[0] for i in (0, 23, 1, 22))
    assert len(tiny.row_groups_read) == 4


def test_shards_are_validated(cifar_root, imr_root, tmp_path):
    out = tmp_path / "shards"
    prepare_shards("imagenet-r", str(imr_root), str(out), rows_per_group=4, num_tasks=3)
    with pytest.raises(DataError, match="already holds prepared shards"):
        prepare_shards("imagenet-r", str(imr_root), str(out))
    with pytest.raises(DataError, match=r"holds benchmark 'imagenet-r', but data.benchmark is 'cifar100'"):
        bench("cifar100", num_tasks=10, shards=str(out))
    with pytest.raises(DataError, match="no manifest.json there"):
        bench("imagenet-r", num_tasks=3, shards=str(tmp_path))
    with pytest.raises(ValueError, match="data.class_order must be a permutation of 0..5"):
        bench("imagenet-r", num_tasks=3, shards=str(out), class_order=list(range(10)))
    man = json.loads((out / "manifest.json").read_text())
    part = out / man["splits"]["test"]["files"][0]["path"]
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF  # same size, different bytes: only the sha256 check sees it
    part.write_bytes(bytes(data))
    assert verify_shards(str(out), hashes=False)["hashes_checked"] is False
    with pytest.raises(DataError, match="sha256 differs for 1 file"):
        verify_shards(str(out))
    assert data_cli(["verify", str(out)]) == 2
    part.write_bytes(bytes(data[:-1]))
    with pytest.raises(DataError, match=r"1 shard file\(s\) do not match the manifest .*bytes, manifest"):
        bench("imagenet-r", num_tasks=3, shards=str(out))
    assert data_cli(["prepare", "imagenet-r", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    # overwrite replaces everything
    prepare_shards("imagenet-r", str(imr_root), str(out), rows_per_group=5, num_tasks=2, overwrite=True)
    assert verify_shards(str(out))["files"] == 4


@pytest.fixture
def imr_shards(imr_root, tmp_path):
    """Shards of the ImageNet-R fixture (rows_per_group 4: the first train file has row groups [4, 4])."""
    prepare_shards("imagenet-r", str(imr_root), str(tmp_path / "shards"), rows_per_group=4, num_tasks=3)
    return tmp_path / "shards"


def _rewrite_first_entry(shards, **values) -> None:
    """Set ``values`` in the manifest entry of the first train file."""
    man = json.loads((shards / "manifest.json").read_text())
    man["splits"]["train"]["files"][0].update(values)
    (shards / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("values,message", [
    ({"sha256": None}, r"splits.train.files\[0\] needs path \(str\), size \(int\), .*sha256 \(str\)"),
    ({"row_groups": [4, 3]}, r"splits.train.files\[0\]: row_groups \[4, 3\] must be positive and add up to num_rows 8"),
    ({"labels": [[0, 4], [1, 3]]}, (r"splits.train.files\[0\]: labels must be \[label, count\] runs adding up to "
                                    r"num_rows 8")),
    ({"num_rows": 9, "row_groups": [4, 5], "labels": [[0, 4], [1, 5]]},
     r"splits.train: the files' num_rows do not add up to its num_rows 24"),
])
def test_shard_manifest_layout_is_checked(imr_shards, values, message):
    """A manifest that the reader could not follow is refused when read, naming the entry and what is wrong."""
    _rewrite_first_entry(imr_shards, **values)
    with pytest.raises(DataError, match=rf"manifest.json: {message}; the manifest is damaged or was not written by "
                                        r"`inflora-data prepare`; run `inflora-data verify"):
        verify_shards(str(imr_shards), hashes=False)


@pytest.mark.parametrize("row_groups,message", [
    ([2, 2, 4], r"2 row groups and schema \['image', .*\], the manifest says 3 row groups"),
    ([3, 5], r"row group 0 holds 4 rows \(0 without an image\), the manifest says 3"),
])
def test_shard_reader_checks_each_file_against_the_manifest(imr_shards, row_groups, message):
    """The row groups a worker finds must be the ones the manifest describes (a manifest from other shards)."""
    _rewrite_first_entry(imr_shards, row_groups=row_groups)
    b = bench("imagenet-r", num_tasks=3, shards=str(imr_shards))
    with pytest.raises(DataError, match=rf"shard file \S+/train/task-000/part-00000.parquet is damaged \({message}"):
        b.train.load(0)


def test_learner_trains_from_shards(cifar_root, tmp_path):
    """The continual loop runs on a Parquet-backed benchmark exactly as on the raw folder."""
    from helpers import tiny_overrides
    from inflora_ray.training.learner import ContinualLearner

    out = tmp_path / "shards"
    prepare_shards("cifar100", str(cifar_root), str(out), rows_per_group=8, num_tasks=10, verify_release=False)
    runs = []
    for data in ([f"data.root={cifar_root}"], [f"data.shards={out}"]):
        cfg = load_config("quickstart", tiny_overrides(**{"data.benchmark": "cifar100", "data.num_tasks": 50,
                                                          "data.class_order_seed": 1993,
                                                          "data.verify_release": "false"}) + data)
        learner = ContinualLearner(cfg)
        learner.run(stop_after_task=1)
        runs.append(learner.counts.to_dict())
    assert runs[0] == runs[1]


# ------------------------------------------------------------------------------------------ presets, normalisation
@pytest.mark.parametrize("preset,benchmark,tasks", [("cifar100-10", "cifar100", 10), ("imagenet-r-5", "imagenet-r", 5),
                                                    ("imagenet-r-10", "imagenet-r", 10),
                                                    ("imagenet-r-20", "imagenet-r", 20),
                                                    ("domainnet-5", "domainnet", 5)])
def test_presets_load_with_root_override(preset, benchmark, tasks, tmp_path):
    with pytest.raises(ConfigError, match=f"data.root: benchmark '{benchmark}' needs data.root"):
        load_config(preset)
    cfg = load_config(preset, [f"data.root={tmp_path}"])
    assert (cfg.data.benchmark, cfg.data.num_tasks, cfg.data.root) == (benchmark, tasks, str(tmp_path))
    assert cfg.model.name == "vit_base_patch16_224.augreg_in21k" and cfg.model.pretrained
    assert cfg.data.batch_size == 128 and cfg.train.weight_decay == 0 and cfg.data.normalize == "none"
    expect = {"cifar100": ("adam", 5e-4, 20, 10, 0.95, "cosine-repeat-first"),
              "imagenet-r": ("adam", 5e-4, 50, 10, 0.98, "cosine-repeat-first"),
              "domainnet": ("sgd", 5e-3, 5, 30, 0.95, "step")}[benchmark]
    t, m = cfg.train, cfg.method
    assert (t.optimizer, t.lr, t.epochs, m.rank, m.lamb, t.schedule) == expect and m.lame == 1.0
    if benchmark == "domainnet":
        assert t.head_lr == 1e-2 and t.step_milestones == [4] and t.step_gamma == 0.1 and t.momentum == 0.9


def test_normalization_options(imr_root):
    assert resolve_normalization("none") == (None, None)
    assert resolve_normalization("backbone", "vit_base_patch16_224.augreg_in21k") == ((0.5,) * 3, (0.5,) * 3)
    assert resolve_normalization("imagenet")[0] == pytest.approx((0.485, 0.456, 0.406))
    cfg = DataConfig(benchmark="imagenet-r", root=str(imr_root), num_tasks=3, normalize="backbone")
    b = build_benchmark(cfg, 32, model="vit_base_patch16_224.augreg_in21k")
    assert b.preprocess.mean == (0.5, 0.5, 0.5) and float(b.preprocess.test(b.test.load(0)).min()) < 0
    with pytest.raises(ValueError, match="data.normalize=backbone needs the model name"):
        build_benchmark(cfg, 32)


def test_shards_through_a_uri_filesystem(imr_root, tmp_path):
    """The object-store code path (pyarrow filesystem from a URI; file:// stands in for s3:// / gs://)."""
    uri = f"file://{tmp_path}/bucket/imr"
    prepare_shards("imagenet-r", str(imr_root), uri, rows_per_group=2, num_tasks=3)
    cfg = load_config("imagenet-r-5", [f"data.shards={uri}", "data.num_tasks=3"])
    b = build_benchmark(cfg.data, 32)
    raw = bench("imagenet-r", imr_root, num_tasks=3)
    assert all(b.test.encoded(i)[0] == raw.test.encoded(i)[0] for i in range(len(raw.test)))
    assert verify_shards(uri)["rows"] == {"train": 24, "test": 6}


@pytest.mark.parametrize("benchmark", ["cifar100", "imagenet-r", "domainnet"])
def test_sample_dataset_on_demand_goes_through_prepare_and_verify(benchmark, tmp_path, capsys):
    """``inflora-data sample`` writes a small dataset in the benchmark's layout that ``prepare`` and ``verify``
    take as they take the release; a bad ``--num-tasks`` is named as the flag the user typed."""
    src, out = tmp_path / benchmark, tmp_path / "shards"
    assert data_cli(["sample", benchmark, "--out", str(src)]) == 0
    classes = json.loads(capsys.readouterr().out)["num_classes"]
    extra = ["--no-verify-release"] if benchmark == "cifar100" else []
    assert data_cli(["prepare", benchmark, "--source", str(src), "--out", str(out), "--num-tasks", "2", *extra]) == 0
    assert json.loads(capsys.readouterr().out)["num_classes"] == classes
    assert data_cli(["verify", str(out)]) == 0 and json.loads(capsys.readouterr().out)["hashes_checked"]
    assert data_cli(["prepare", benchmark, "--source", str(src), "--out", str(tmp_path / "x"), "--num-tasks",
                     str(classes + 1), *extra]) == 2
    assert f"error: --num-tasks {classes + 1}: must be between 1 and the {classes} classes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert data_cli(["sample", benchmark, "--out", str(src)]) == 2  # never written over
    assert "exists and is not empty" in capsys.readouterr().err
