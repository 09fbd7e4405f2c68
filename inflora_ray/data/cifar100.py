"""CIFAR-100 from the standard python release: ``cifar-100-python/{train,test,meta}`` pickles.

Layout of the release (Krizhevsky 2009): ``train``/``test`` are dicts with ``b'data'`` (N x 3072 uint8, the
red, green and blue planes of a 32x32 image, row-major), ``b'fine_labels'`` (N ints in 0..99) and
``b'filenames'``; ``meta`` has ``b'fine_label_names'``. The pickles were written by Python 2 and load with
``encoding='bytes'``. Before a file is read, its MD5 must be the official release's (opt-out for modified
copies: ``data.verify_release=false``), and it is always read with an unpickler that rebuilds only plain data
and numpy arrays, so a crafted file cannot run code. Samples are ordered by label (stable: a class keeps the
release's order), so each class is one contiguous block of indices (the same order the Parquet shards store).
"""
from __future__ import annotations

import os
import pickle
from typing import Optional

import numpy as np
import torch

from ..storage import file_digest
from .base import DataError, label_sorted_order

FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
# MD5 of the official release's files (as published with the dataset, e.g. in torchvision's CIFAR100), checked
# before a file is read unless data.verify_release is false.
OFFICIAL_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                "meta": "7973b15100ade9c7d40fb424638fde48"}
OPT_OUT = "data.verify_release=false (inflora-data prepare: --no-verify-release)"


def check_official(folder: str, md5: dict[str, str]) -> None:
    """Raise DataError, naming each file with its MD5 and the official one, unless every file's MD5 (``md5``:
    name -> hex digest) is the official release's."""
    bad = [f"{os.path.join(folder, n)} has MD5 {md5[n]}, the official release's is {OFFICIAL_MD5[n]}"
           for n in FILES if md5[n] != OFFICIAL_MD5[n]]
    if bad:
        raise DataError(f"not the official CIFAR-100 python release: {'; '.join(bad)}. The copy is altered or "
                        "damaged: extract cifar-100-python.tar.gz again (or set data.download=true with an empty "
                        f"data.root); to use a modified copy on purpose, set {OPT_OUT}")


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode(text, 'latin1')``: how Python 3 pickles a bytes object at protocol 2 (copies of the
    release re-pickled by Python 3); other encodings are refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not latin-1 text")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals the release's pickles reference: numpy's array reconstruction (numpy 1 and 2 module
    names), and the latin-1 encoding of bytes that Python 3 writes at protocol 2."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_bytes}


class _ReleaseUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild plain containers, numbers, strings and numpy arrays: any other global
    (a function a crafted file would call) raises DataError before it is imported."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        """The allowed object for ``module.name``; DataError naming it for anything else."""
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refused to load global {module}.{name}: the CIFAR-100 python release "
                            "holds only dicts, lists, numbers, byte strings and numpy arrays, so this file is not a "
                            "copy of it (it could run code when read); use the official release, or save a modified "
                            "copy with plain data and numpy arrays only") from None


def _unpickle(path: str) -> dict:
    """The dict pickled in ``path``, read with :class:`_ReleaseUnpickler`."""
    try:
        with open(path, "rb") as f:
            obj = _ReleaseUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # a damaged pickle raises many types (UnpicklingError, EOFError, TypeError, ...)
        raise DataError(f"{path}: not a CIFAR-100 python pickle ({type(e).__name__}: {e}); extract "
                        "cifar-100-python.tar.gz again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get(d: dict, key: str, path: str):
    """``d[key]`` under its bytes or str key; DataError naming the file if it is missing."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: key {key!r} missing; expected the CIFAR-100 python release "
                    f"(keys b'data', b'fine_labels' in train/test, b'fine_label_names' in meta)")


def _array(d: dict, key: str, dtype, path: str) -> np.ndarray:
    """``d[key]`` as a numpy array of ``dtype``; DataError naming the file if it does not convert."""
    try:
        return np.asarray(_get(d, key, path), dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: {key!r} is not an array of {np.dtype(dtype).name} ({e}); expected the "
                        "CIFAR-100 python release") from None


def _class_names(path: str) -> list[str]:
    """The fine label names in the ``meta`` file at ``path``."""
    names = _get(_unpickle(path), "fine_label_names", path)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path}: 'fine_label_names' must be a list of strings; expected the CIFAR-100 python "
                        "release")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]


class Cifar100Source:
    """One split of CIFAR-100 (uint8 arrays from the pickle). The pixel array is dropped when pickled
    (DataLoader processes, Ray workers) and re-read from the file on first use there, after checking that the
    file still has the MD5 (``md5``) it had when the benchmark was built."""

    def __init__(self, folder: str, split: str, md5: str):
        self.folder = folder
        self.split = split
        self.path = os.path.join(folder, split)
        self.md5 = md5
        data, labels = self._read()
        self.order = label_sorted_order(labels)  # position -> index in the release
        self.labels = labels[self.order]
        self._data: Optional[np.ndarray] = data

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        """(pixels N x 3072, labels) of the split's file, in the release's order."""
        d = _unpickle(self.path)
        data = _array(d, "data", np.uint8, self.path)
        labels = _array(d, "fine_labels", np.int64, self.path)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1 or data.shape[0] != len(labels):
            raise DataError(f"{self.path}: b'data' must be N x 3072 uint8 with N = len(fine_labels), "
                            f"got {data.shape} and labels of shape {labels.shape}")
        return data, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = None
        return state

    def _array(self) -> np.ndarray:
        """The pixels, read on first use in this process (a worker) from the same file the driver read."""
        if self._data is None:
            now = file_digest(self.path, "md5")
            if now != self.md5:
                raise DataError(f"{self.path}: MD5 {now} differs from {self.md5} of the file read when the benchmark "
                                "was built; the file changed since, or this node holds another copy. Every node "
                                "must see the same copy: restore it, or start the run again")
            self._data, _ = self._read()
        return self._data

    def load(self, index: int) -> torch.Tensor:
        row = self._array()[self.order[index]]
        return torch.from_numpy(row.reshape(3, 32, 32).copy())

    def encoded(self, index: int) -> tuple[bytes, str]:
        """PNG bytes (lossless) of sample ``index``, for Parquet shards."""
        import io

        from PIL import Image

        img = self.load(index).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(img, mode="RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"

    def key(self, index: int) -> str:
        return f"{self.split}/{int(self.order[index])}"


def find_folder(root: str) -> Optional[str]:
    """The folder holding train/test/meta: ``root/cifar-100-python`` or ``root`` itself; None if neither."""
    for cand in (os.path.join(root, FOLDER), root):
        if all(os.path.isfile(os.path.join(cand, n)) for n in FILES):
            return cand
    return None


def _download(root: str) -> None:
    """Download and extract the release into ``root`` with torchvision (which checks the archive's MD5)."""
    try:
        from torchvision.datasets import CIFAR100
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise DataError(f"data.download=true needs torchvision: {e}") from None
    os.makedirs(root, exist_ok=True)
    CIFAR100(root=root, train=True, download=True)


def load_cifar100_sources(root: str, download: bool = False, verify_release: bool = True):
    """Train/test sources, the 100 fine class names, and a provenance manifest.

    ``root`` is the folder that contains ``cifar-100-python/`` (or that folder itself). With ``download``
    and no copy there, torchvision downloads the release into ``root`` first. With ``verify_release`` every
    file must have the official release's MD5 before it is read; either way the pickles are read with an
    unpickler that refuses anything but plain data and numpy arrays.
    """
    root = os.path.expanduser(root)
    folder = find_folder(root)
    if folder is None and download:
        _download(root)
        folder = find_folder(root)
    if folder is None:
        raise DataError(f"data.root={root!r}: no CIFAR-100 python release there; expected "
                        f"{os.path.join(root, FOLDER)}/ with the files 'train', 'test' and 'meta' "
                        "(extract cifar-100-python.tar.gz there, or set data.download=true)")
    md5 = {n: file_digest(os.path.join(folder, n), "md5") for n in FILES}
    if verify_release:
        check_official(folder, md5)
    names = _class_names(os.path.join(folder, "meta"))
    train, test = Cifar100Source(folder, "train", md5["train"]), Cifar100Source(folder, "test", md5["test"])
    for src in (train, test):
        if len(src) and (src.labels.min() < 0 or src.labels.max() >= len(names)):
            raise DataError(f"{src.path}: fine_labels must be in 0..{len(names) - 1}")
    manifest = {
        "source": "cifar100", "release": FOLDER, "folder": os.path.abspath(folder),
        "split": "the release's train/test files", "order": "by label, release order within a class",
        "num_train": len(train), "num_test": len(test), "num_classes": len(names),
        "md5": md5, "official_release": md5 == OFFICIAL_MD5, "release_verified": bool(verify_release),
    }
    return train, test, names, manifest
