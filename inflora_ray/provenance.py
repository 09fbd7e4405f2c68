"""What code and hardware produced a run: the git commit when there is one, otherwise (and always) a content
hash of the package that ran, the package version, Ray's working-dir package under ``ray job submit``, and the
CUDA build, driver and GPU model when a GPU is present.

On a cluster the git commit is usually missing: ``.git`` is not part of a job's working dir and cluster images
install the package without it. The content hash identifies the code all the same: two runs with the same hash
ran the same ``.py`` and preset files.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent
HASHED_SUFFIXES = (".py", ".yaml")  # the code and the presets; not weights or data manifests (checked apart)


def git_commit() -> Optional[str]:
    """The git commit of the code (working directory, else the package's checkout), if any."""
    for cwd in (os.getcwd(), str(PACKAGE)):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
            if out.returncode == 0:
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def code_hash(root: Path = PACKAGE) -> str:
    """sha256 over the package's ``.py`` and ``.yaml`` files: each file's path relative to ``root`` (with '/')
    and its bytes, in sorted path order. The same on every machine for the same files; ``__pycache__`` and
    anything else are ignored."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.suffix in HASHED_SUFFIXES and p.is_file()
                   and "__pycache__" not in p.relative_to(root).parts)
    for p in files:
        data = p.read_bytes()
        rel = p.relative_to(root).as_posix().encode()
        # Lengths first: no two different file sets can produce the same byte stream.
        h.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def ray_working_dir() -> Optional[str]:
    """The URI of the working-dir package of this Ray job (``gcs://_ray_pkg_<hash>.zip``), if it has one."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        wd = ray.get_runtime_context().runtime_env.get("working_dir")
        return wd if isinstance(wd, str) else None
    except Exception:  # provenance is recorded best effort; never stop a run over it
        return None


def code_identity() -> dict:
    """``git_commit`` (None without a checkout), ``code_sha256`` (:func:`code_hash`; None if the package's
    files could not be read), ``package_version`` and ``ray_working_dir`` (None outside ``ray job submit``)."""
    from . import __version__

    try:
        digest: Optional[str] = code_hash()
    except OSError:  # recorded best effort: a run is never stopped over its provenance
        digest = None
    return {"git_commit": git_commit(), "code_sha256": digest, "package_version": __version__,
            "ray_working_dir": ray_working_dir()}


def _nvidia_driver() -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


def accelerator() -> Optional[dict]:
    """``cuda`` (torch's CUDA build), ``driver``, ``gpu`` (model of device 0) and ``gpu_count`` of this
    process, or None without a usable GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return {"cuda": torch.version.cuda, "driver": _nvidia_driver(), "gpu": torch.cuda.get_device_name(0),
            "gpu_count": torch.cuda.device_count()}
