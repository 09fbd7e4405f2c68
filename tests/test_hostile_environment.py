"""A working directory or HOME that cannot be written: each is refused before any compute (no Ray started, no
dataset read, no MLflow store opened), in well under a second instead of after Ray's start (HOME) or two
minutes of MLflow's retries (a read-only working directory with the default store), with exit code 2 and a
message naming the directory and what to change; nothing is written anywhere, and the same command works once
that is changed. The tests run as root, for whom no permission bit stops a write: the unwritable places are
real ones (sysfs, where root cannot create files; a deleted directory; a regular file), not chmod."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import tiny_overrides
from inflora_ray.preflight import PreflightError, check_environment
from inflora_ray.presets import load_config

REPO = Path(__file__).resolve().parents[1]
READ_ONLY = "/sys/kernel"  # sysfs: even root cannot create a file here


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _sysfs_is_read_only() -> bool:
    try:
        open(os.path.join(READ_ONLY, ".inflora-probe"), "w").close()
    except OSError:
        return True
    os.remove(os.path.join(READ_ONLY, ".inflora-probe"))
    return False


# case -> (HOME: "good" / "missing" / "file" / "sysfs", working directory: "good" / "sysfs" / "deleted",
#          extra arguments, the message's fragments). Every row exits 2 before any compute.
CASES = {
    "HOME missing": ("missing", "good", ["--no-tracking"], ["HOME=", "does not exist", "set HOME to"]),
    "HOME a regular file": ("file", "good", ["--no-tracking"], ["HOME=", "is not a directory", "set HOME to"]),
    "HOME unwritable": ("sysfs", "good", ["--no-tracking"], [f"HOME='{READ_ONLY}'", "is not writable"]),
    "cwd read-only, default storage path and store": (
        "good", "sysfs", [], [f"the working directory {READ_ONLY} is not writable", "run.storage_path='runs'",
                              "MLflow's default store sqlite:///", "cd to a writable directory"]),
    "cwd read-only, default store only": (
        "good", "sysfs", ["--storage-path", "STORE"], [f"the working directory {READ_ONLY} is not writable",
                                                       "MLflow's default store", "tracking.enabled=false"]),
    "sqlite store in an unwritable folder": (
        "good", "good", ["--tracking-uri", f"sqlite:///{READ_ONLY}/mlflow.db"],
        [f"the folder {READ_ONLY} of the MLflow store", "is not writable", "--tracking-uri"]),
    "cwd deleted": ("good", "deleted", ["--storage-path", "STORE", "--no-tracking"],
                    ["the working directory no longer exists", "cd to an existing"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_environment_is_refused_at_once(case, tmp_path, monkeypatch, capsys):
    if not _sysfs_is_read_only():
        pytest.skip(f"{READ_ONLY} is writable here")
    home_kind, cwd_kind, extra, fragments = CASES[case]
    good_home, store = tmp_path / "home", tmp_path / "runs"
    good_home.mkdir()
    home = {"good": good_home, "missing": tmp_path / "no-such-home", "file": tmp_path / "home-file",
            "sysfs": Path(READ_ONLY)}[home_kind]
    if home_kind == "file":
        home.write_text("not a folder\n")
    cwd = {"good": tmp_path / "work", "sysfs": Path(READ_ONLY), "deleted": tmp_path / "gone"}[cwd_kind]
    if cwd_kind != "sysfs":
        cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(cwd)
    if cwd_kind == "deleted":
        cwd.rmdir()
    args = ["--config", "quickstart", *[str(store) if a == "STORE" else a for a in extra], *tiny_overrides()]
    before = _files(tmp_path)
    capsys.readouterr()
    start = time.monotonic()
    code = importlib.import_module("inflora_ray.run").main(args)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert code == 2, err[-2000:]
    for fragment in fragments:
        assert fragment in err, (fragment, err[-2000:])
    assert "Traceback" not in err
    assert elapsed < 10, f"refused after {elapsed:.0f} s"  # before: about 2 minutes (sqlite), 17 s (HOME)
    assert _files(tmp_path) == before  # no HOME made, no runs/, no mlflow.db
    assert not os.path.exists(os.path.join(READ_ONLY, "mlflow.db"))
    if home_kind == "file":
        assert home.read_text() == "not a folder\n"
    # Once the directory named is fixed (HOME set to a writable folder, a writable working directory), the same
    # settings pass.
    monkeypatch.setenv("HOME", str(good_home))
    cfg = load_config("quickstart", [a for a in args[2:] if "=" in a and not a.startswith("--")]
                      + [f"run.storage_path={store}"])
    check_environment(cfg)


def test_environment_check_names_what_writes_into_the_working_directory(tmp_path, monkeypatch):
    """A writable working directory passes whatever the settings; a read-only one only where something would
    be written into it: an absolute storage path with a tracking server (or tracking off) passes."""
    if not _sysfs_is_read_only():
        pytest.skip(f"{READ_ONLY} is writable here")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(READ_ONLY)
    check_environment(load_config("quickstart", [f"run.storage_path={tmp_path}", "tracking.enabled=false"]))
    check_environment(load_config("quickstart", [f"run.storage_path={tmp_path}",
                                                 "tracking.uri=http://127.0.0.1:1"]))
    with pytest.raises(PreflightError, match=r"run.storage_path='runs' \(relative"):
        check_environment(load_config("quickstart", ["tracking.enabled=false"]))
    monkeypatch.chdir(tmp_path)
    check_environment(load_config("quickstart", []))
    assert _files(tmp_path) == set()  # the probes leave nothing


def test_deleted_working_directory_is_named_before_torch_aborts(tmp_path):
    """From a deleted working directory, importing torch aborts the process ("oneMKL FATAL ERROR"); every CLI
    says what is wrong before it gets there, with exit code 2, in about a second."""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = (f"import os, subprocess, sys\nos.chdir({str(gone)!r})\nos.rmdir({str(gone)!r})\n"
              "p = subprocess.run([sys.executable, '-m', 'inflora_ray.run', '--config', 'quickstart'], "
              "capture_output=True, text=True, timeout=60)\n"
              "sys.stdout.write(f'{p.returncode}\\n{p.stderr}')\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.monotonic() - start
    code, _, err = out.stdout.partition("\n")
    assert code == "2", out.stdout[-2000:] + out.stderr[-2000:]
    assert "the working directory no longer exists" in err and "FATAL" not in err, err[-2000:]
    assert elapsed < 30, f"{elapsed:.0f} s"
