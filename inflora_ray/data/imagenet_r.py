"""ImageNet-R (Hendrycks et al. 2021) from its released folder, with a fixed, versioned 80/20 split.

Layout: ``imagenet-r/<wnid>/<file>.jpg`` with 200 WordNet-id folders (``n01443537``, ...). The release has no
train/test split and the InfLoRA paper's split is not published, so ours is a rule on each file's relative
path (``<wnid>/<file>``), identical on every machine and never touching the user's files:

    per class, sort the files by sha256(f"{SPLIT_SEED}:{relpath}") (hex); the first floor(0.8 n + 0.5) are
    train, the rest test.                                                           (version SPLIT_VERSION)

A split manifest (JSON: per file its relative path, split, label, size and sha256) is written from a real copy
by ``python -m inflora_ray.data manifest imagenet-r --source PATH --out FILE``; loading with it
(``data.manifest``) checks that every listed file is there with its size (and its sha256 with
``data.verify_hashes``), so a missing or altered file fails before training. ``data.manifest=packaged`` uses
the manifest shipped in ``inflora_ray/data/manifests/`` (see the README there).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import resources
from typing import Callable, Optional

import numpy as np

from ..storage import file_digest
from .base import DataError, FileSource

SPLIT_VERSION = "imagenet-r-split-v1"
SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
NUM_CLASSES = 200
MANIFEST_FORMAT = "inflora-ray-split-manifest"
PACKAGED_MANIFEST = f"{SPLIT_VERSION}.json"
SPLIT_RULE = (f"per class, sort files by sha256(f'{{seed}}:{{relpath}}') hex digest; the first "
              f"floor({TRAIN_FRACTION} * n + 0.5) are train, the rest test")
WNID = re.compile(r"^n\d{8}$")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def num_train(n: int) -> int:
    """Train files of a class with ``n`` files (80%, halves rounded up)."""
    return int(np.floor(TRAIN_FRACTION * n + 0.5))


def split_class(relpaths: list[str], seed: int = SPLIT_SEED) -> dict[str, str]:
    """relpath -> "train"/"test" for one class's files, by the versioned rule."""
    ranked = sorted(relpaths, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    k = num_train(len(ranked))
    return {p: ("train" if i < k else "test") for i, p in enumerate(ranked)}


def scan(root: str) -> tuple[list[str], list[list[tuple[str, int]]]]:
    """Class folders (sorted wnids) and, per class, its image files as sorted (relpath, size)."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DataError(f"data.root={root!r}: not a directory; expected the extracted imagenet-r/ folder")
    with os.scandir(root) as it:
        entries = sorted((e.name for e in it if e.is_dir() and WNID.match(e.name)))
    if not entries:
        hint = ""
        if os.path.isdir(os.path.join(root, "imagenet-r")):
            hint = f" (found {os.path.join(root, 'imagenet-r')}: point data.root there)"
        raise DataError(f"data.root={root!r}: wrong folder layout for ImageNet-R: expected class folders named "
                        f"by WordNet id (e.g. {os.path.join(root, 'n01443537', 'art_0.jpg')}), found none{hint}")
    files = []
    for wnid in entries:
        with os.scandir(os.path.join(root, wnid)) as it:
            cls = sorted((f"{wnid}/{e.name}", e.stat().st_size) for e in it
                         if e.is_file() and not e.name.startswith(".")
                         and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not cls:
            raise DataError(f"data.root={root!r}: class folder {wnid}/ holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); is the copy complete?")
        files.append(cls)
    return entries, files


def build_split_manifest(root: str, hashes: bool = True, seed: int = SPLIT_SEED,
                         progress: Optional[Callable[[str], None]] = None) -> dict:
    """The split manifest of a copy of ImageNet-R (per file: path, split, label, size, sha256)."""
    root = os.path.expanduser(root)
    wnids, files = scan(root)
    rows = []
    for label, cls in enumerate(files):
        split = split_class([p for p, _ in cls], seed)
        for p, size in cls:
            rows.append({"path": p, "split": split[p], "label": label, "size": size,
                         "sha256": file_digest(os.path.join(root, *p.split("/"))) if hashes else None})
        if progress and (label + 1) % 20 == 0:
            progress(f"{label + 1}/{len(files)} classes")
    return {"format": MANIFEST_FORMAT, "version": SPLIT_VERSION, "seed": seed, "rule": SPLIT_RULE,
            "train_fraction": TRAIN_FRACTION, "classes": wnids, "num_files": len(rows),
            "num_train": sum(r["split"] == "train" for r in rows),
            "num_test": sum(r["split"] == "test" for r in rows), "files": rows}


def packaged_manifest_path() -> str:
    return str(resources.files("inflora_ray") / "data" / "manifests" / PACKAGED_MANIFEST)


def read_split_manifest(spec: str) -> tuple[dict, str]:
    """The manifest at a path, or the packaged one for ``"packaged"``; also its sha256."""
    path = packaged_manifest_path() if spec == "packaged" else os.path.expanduser(spec)
    if not os.path.isfile(path):
        if spec == "packaged":
            raise DataError(f"data.manifest=packaged: no packaged ImageNet-R split manifest yet ({path}); "
                            "generate one from a complete copy with `python -m inflora_ray.data manifest "
                            "imagenet-r --source PATH --out FILE` and pass data.manifest=FILE, or leave "
                            "data.manifest null to apply the split rule to the files found")
        raise DataError(f"data.manifest={spec!r}: file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        man = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"data.manifest={spec!r}: not JSON ({e})") from None
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT or "files" not in man:
        raise DataError(f"data.manifest={spec!r}: not an inflora-ray ImageNet-R split manifest")
    _check_rows(spec, man)
    return man, hashlib.sha256(raw).hexdigest()


# A manifest row's path: <wnid>/<file>, so that a manifest cannot make a reader open files outside data.root.
_ROW_PATH = re.compile(r"n\d{8}/(?!\.\.?$)[^/\\]+")
_REGENERATE = "regenerate it with `inflora-data manifest imagenet-r --source PATH --out FILE`"


def _good_row(row, num_classes: int) -> bool:
    """A manifest file row: path '<wnid>/<file>', split, integer size and a label of one of the classes."""
    return (isinstance(row, dict) and isinstance(row.get("path"), str) and _ROW_PATH.fullmatch(row["path"]) is not None
            and row.get("split") in ("train", "test") and isinstance(row.get("size"), int)
            and isinstance(row.get("label"), int) and 0 <= row["label"] < num_classes)


def _check_rows(spec: str, man: dict) -> None:
    """The classes and file rows a split manifest must hold; a DataError names the first bad one."""
    classes, rows = man.get("classes"), man["files"]
    if not isinstance(classes, list) or not isinstance(rows, list):
        raise DataError(f"data.manifest={spec!r}: 'classes' and 'files' must be lists; {_REGENERATE}")
    for k, row in enumerate(rows):
        if not _good_row(row, len(classes)):
            raise DataError(f"data.manifest={spec!r}: files[{k}] must have path '<wnid>/<file>', split 'train' or "
                            f"'test', an integer size and a label in 0..{len(classes) - 1}, got {row!r:.200}; "
                            f"{_REGENERATE}")


def verify_files(root: str, man: dict, hashes: bool = False) -> None:
    """Raise DataError naming the missing or altered files of ``man`` under ``root`` (size always; sha256
    too with ``hashes``)."""
    missing, altered = [], []
    for row in man["files"]:
        path = os.path.join(root, *row["path"].split("/"))
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            missing.append(row["path"])
            continue
        if size != row["size"]:
            altered.append(f"{row['path']} (size {size}, manifest {row['size']})")
        elif hashes:
            if row.get("sha256") is None:
                raise DataError("data.verify_hashes=true but the manifest has no sha256 (generated without "
                                "hashes); regenerate it with hashes")
            if file_digest(path) != row["sha256"]:
                altered.append(f"{row['path']} (sha256 differs)")
    if missing or altered:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if altered:
            parts.append(f"{len(altered)} altered (e.g. {', '.join(altered[:3])})")
        raise DataError(f"data.root={root!r} does not match the split manifest {man.get('version')}: "
                        f"{'; '.join(parts)}. Restore the original files, or regenerate the manifest "
                        "(a different copy gives a different benchmark)")


def _listing_digest(rows: list[tuple[str, str, int]]) -> str:
    """sha256 over the sorted (relpath, split, size) lines: equal digests mean the same files and split."""
    h = hashlib.sha256()
    for p, s, size in sorted(rows):
        h.update(f"{p}\t{s}\t{size}\n".encode())
    return h.hexdigest()


def load_imagenet_r_sources(root: str, manifest: Optional[str] = None, verify_hashes: bool = False):
    """Train/test sources (ordered by label, then relative path), the class wnids, and a provenance manifest.

    Without ``manifest`` the split rule is applied to the files found; with one, its split is used and the
    files are checked against it (size; sha256 with ``verify_hashes``).
    """
    root = os.path.expanduser(root)
    if manifest is None:
        wnids, files = scan(root)
        rows = []  # (relpath, split, size, label)
        for label, cls in enumerate(files):
            split = split_class([p for p, _ in cls])
            rows += [(p, split[p], size, label) for p, size in cls]
        provenance = {"split_source": "rule"}
    else:
        if not os.path.isdir(root):
            raise DataError(f"data.root={root!r}: not a directory; expected the extracted imagenet-r/ folder")
        man, digest = read_split_manifest(manifest)
        verify_files(root, man, hashes=verify_hashes)
        wnids = list(man["classes"])
        rows = [(r["path"], r["split"], r["size"], int(r["label"])) for r in man["files"]]
        provenance = {"split_source": "manifest", "manifest": manifest, "manifest_sha256": digest,
                      "manifest_version": man.get("version"), "hashes_verified": bool(verify_hashes)}
    rows.sort(key=lambda r: (r[3], r[0]))
    sources = {}
    for split in ("train", "test"):
        mine = [r for r in rows if r[1] == split]
        sources[split] = FileSource(root, [r[0] for r in mine], np.asarray([r[3] for r in mine], dtype=np.int64))
    manifest_out = {
        "source": "imagenet-r", "root": os.path.abspath(root), "split_version": SPLIT_VERSION,
        "split_seed": SPLIT_SEED, "split_rule": SPLIT_RULE, "num_classes": len(wnids),
        "complete": len(wnids) == NUM_CLASSES, "num_train": len(sources["train"]),
        "num_test": len(sources["test"]), "listing_sha256": _listing_digest([r[:3] for r in rows]),
        "order": "by label (sorted wnid), then relative path", **provenance,
    }
    return sources["train"], sources["test"], wnids, manifest_out
