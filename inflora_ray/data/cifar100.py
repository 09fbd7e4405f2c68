"""CIFAR-100 from the standard python release: ``cifar-100-python/{train,test,meta}`` pickles.

Layout of the release (Krizhevsky 2009): ``train``/``test`` are dicts with ``b'data'`` (N x 3072 uint8, the
red, green and blue planes of a 32x32 image, row-major), ``b'fine_labels'`` (N ints in 0..99) and
``b'filenames'``; ``meta`` has ``b'fine_label_names'``. The pickles were written by Python 2 and load with
``encoding='bytes'``. Samples are ordered by label (stable: a class keeps the release's order), so each class
is one contiguous block of indices (the same order the Parquet shards store).
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
# MD5 of the official release's files (as published with the dataset), to record whether a copy is official.
OFFICIAL_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                "meta": "7973b15100ade9c7d40fb424638fde48"}


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR-100 python pickle ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get(d: dict, key: str, path: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: key {key!r} missing; expected the CIFAR-100 python release "
                    f"(keys b'data', b'fine_labels' in train/test, b'fine_label_names' in meta)")


class Cifar100Source:
    """One split of CIFAR-100 (uint8 arrays from the pickle). The pixel array is dropped when pickled
    (DataLoader processes, Ray workers) and re-read from the file on first use there."""

    def __init__(self, folder: str, split: str):
        self.folder = folder
        self.split = split
        self.path = os.path.join(folder, split)
        data, labels = self._read()
        self.order = label_sorted_order(labels)  # position -> index in the release
        self.labels = labels[self.order]
        self._data: Optional[np.ndarray] = data

    def _read(self) -> tuple[np.ndarray, np.ndarray]:
        d = _unpickle(self.path)
        data = np.asarray(_get(d, "data", self.path), dtype=np.uint8)
        labels = np.asarray(_get(d, "fine_labels", self.path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
            raise DataError(f"{self.path}: b'data' must be N x 3072 uint8 with N = len(fine_labels), "
                            f"got {data.shape} and {len(labels)} labels")
        return data, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = None
        return state

    def _array(self) -> np.ndarray:
        if self._data is None:
            self._data, labels = self._read()
            if not np.array_equal(labels[self.order], self.labels):
                raise DataError(f"{self.path} changed since the benchmark was built")
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
        if all(os.path.isfile(os.path.join(cand, n)) for n in ("train", "test", "meta")):
            return cand
    return None


def load_cifar100_sources(root: str, download: bool = False):
    """Train/test sources, the 100 fine class names, and a provenance manifest.

    ``root`` is the folder that contains ``cifar-100-python/`` (or that folder itself). With ``download``
    and no copy there, torchvision downloads the release into ``root`` first.
    """
    root = os.path.expanduser(root)
    folder = find_folder(root)
    if folder is None and download:
        try:
            from torchvision.datasets import CIFAR100
        except ImportError as e:  # pragma: no cover - torchvision is a dependency
            raise DataError(f"data.download=true needs torchvision: {e}") from None
        os.makedirs(root, exist_ok=True)
        CIFAR100(root=root, train=True, download=True)
        folder = find_folder(root)
    if folder is None:
        raise DataError(f"data.root={root!r}: no CIFAR-100 python release there; expected "
                        f"{os.path.join(root, FOLDER)}/ with the files 'train', 'test' and 'meta' "
                        "(extract cifar-100-python.tar.gz there, or set data.download=true)")
    meta_path = os.path.join(folder, "meta")
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in _get(_unpickle(meta_path), "fine_label_names", meta_path)]
    train, test = Cifar100Source(folder, "train"), Cifar100Source(folder, "test")
    for src in (train, test):
        if len(src) and (src.labels.min() < 0 or src.labels.max() >= len(names)):
            raise DataError(f"{src.path}: fine_labels must be in 0..{len(names) - 1}")
    md5 = {n: file_digest(os.path.join(folder, n), "md5") for n in ("train", "test", "meta")}
    manifest = {
        "source": "cifar100", "release": FOLDER, "folder": os.path.abspath(folder),
        "split": "the release's train/test files", "order": "by label, release order within a class",
        "num_train": len(train), "num_test": len(test), "num_classes": len(names),
        "md5": md5, "official_release": md5 == OFFICIAL_MD5,
    }
    return train, test, names, manifest
