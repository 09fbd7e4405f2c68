"""Code identity (the content hash of the package, recorded when there is no git commit) and the S3 endpoint
settings of :mod:`inflora_ray.storage`. No Ray, no network."""
from __future__ import annotations

import shutil

import pyarrow.fs as pafs
import pytest

from inflora_ray import storage
from inflora_ray.ray_train.faults import FaultPlan
from inflora_ray.provenance import PACKAGE, code_hash, code_identity


@pytest.fixture
def pkg(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    (root / "sub" / "b.py").write_text("y = 2\n")
    (root / "sub" / "c.yaml").write_text("k: v\n")
    return root


def test_code_hash_is_stable_and_changes_with_any_code_file(pkg, tmp_path):
    h = code_hash(pkg)
    assert h == code_hash(pkg) and len(h) == 64
    copy = tmp_path / "elsewhere" / "pkg"  # the same files anywhere: the same hash
    shutil.copytree(pkg, copy)
    assert code_hash(copy) == h
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.py").write_text("compiled")
    (pkg / "notes.txt").write_text("not code")
    assert code_hash(pkg) == h  # caches and non-code files do not count
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert code_hash(pkg) != h
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "sub" / "c.yaml").write_text("k: w\n")  # presets are code too
    assert code_hash(pkg) != h
    (pkg / "sub" / "c.yaml").write_text("k: v\n")
    (pkg / "sub" / "b.py").rename(pkg / "b.py")  # same bytes, another module
    assert code_hash(pkg) != h


def test_code_identity_of_this_package():
    ident = code_identity()
    assert ident["code_sha256"] == code_hash(PACKAGE) and ident["package_version"]
    assert ident["ray_working_dir"] is None  # not under ray job submit


def test_s3_paths_use_the_endpoint_variable(monkeypatch):
    for var in storage.ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)
    assert storage.ray_storage("s3://bucket/runs") == ("s3://bucket/runs", None)  # AWS itself: left to Ray
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    fs, path = storage.filesystem("s3://bucket/runs/x")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/runs/x"
    assert fs.endpoint_override == "127.0.0.1:9000" if hasattr(fs, "endpoint_override") else True
    ray_path, ray_fs = storage.ray_storage("s3://bucket/runs")
    assert ray_path == "bucket/runs" and isinstance(ray_fs, pafs.S3FileSystem)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "minio:9000")  # the S3-specific one wins; needs a scheme
    with pytest.raises(OSError, match="expected http"):
        storage.filesystem("s3://bucket/x")
    assert storage.ray_storage("/tmp/runs") == ("/tmp/runs", None)


def test_hold_is_a_fault_mode():
    assert FaultPlan.parse("task=1,mode=hold").mode == "hold"
    with pytest.raises(ValueError, match="exit|raise|hold"):
        FaultPlan.parse("task=1,mode=sleep")
