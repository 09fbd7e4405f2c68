"""Small generated datasets in each benchmark's real on-disk layout (random images), to try ``inflora-data
prepare`` / ``verify`` and a run's data path without downloading anything: ``inflora-data sample BENCHMARK
--out DIR``. The test suite builds its fixtures with the same functions.

- ``cifar100``: ``DIR/cifar-100-python/{train,test,meta}``, Python-2-style pickles (bytes keys, protocol 2),
  100 classes in a shuffled row order like the release. Their MD5 is not the official release's, so they are
  read with ``data.verify_release=false`` (``prepare --no-verify-release``).
- ``imagenet-r``: ``DIR/<wnid>/<style>_<k>.jpg`` (JPEGs of varied sizes) and the release's ``README.txt``.
- ``domainnet``: ``DIR/<domain>/<class>/<file>.jpg`` for the six domains, and ``DIR/<domain>_{train,test}.txt``.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

WNIDS = ["n01443537", "n01484850", "n01494475", "n01496331", "n01498041", "n01514859"]
STYLES = ["art", "cartoon", "graffiti", "painting", "sketch"]
DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
DN_CLASSES = ["aircraft_carrier", "airplane", "alarm_clock", "ambulance", "angel", "animal_migration", "ant",
              "anvil", "apple", "arm"]


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _new_folder(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; give an empty or new folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_cifar(root: Path) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: 100 classes x 2 train + 1 test image; returns ``root``."""
    folder = _new_folder(Path(root) / "cifar-100-python")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("test", 1)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class)).tolist()
        n = len(labels)
        d = {b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": f"{split} batch".encode(),
             b"fine_labels": labels, b"coarse_labels": [lab // 5 for lab in labels],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
    meta = {b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Path(root)


def write_imagenet_r(root: Path) -> Path:
    """``root/<wnid>/<style>_<k>.jpg``: 6 classes x 5 JPEGs of varied sizes, and ``README.txt``."""
    root = _new_folder(Path(root))
    rng = np.random.default_rng(1)
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        for k, style in enumerate(STYLES):
            (root / wnid / f"{style}_{k}.jpg").write_bytes(_jpeg(rng, 20 + 3 * k, 24 + c))
    (root / "README.txt").write_text("n01443537 goldfish\n")
    return root


def write_domainnet(root: Path) -> Path:
    """``root/<domain>/<class>/...jpg``: six domains, 10 classes, 2 train + 1 test image each, and the
    ``<domain>_{train,test}.txt`` lists."""
    root = _new_folder(Path(root))
    rng = np.random.default_rng(2)
    for domain in DOMAINS:
        lines = {"train": [], "test": []}
        for c, cls in enumerate(DN_CLASSES):
            (root / domain / cls).mkdir(parents=True)
            for k in range(3):
                rel = f"{domain}/{cls}/{domain}_{c:03d}_{k:06d}.jpg"
                (root / rel).write_bytes(_jpeg(rng, 12, 10 + k))
                lines["train" if k < 2 else "test"].append(f"{rel} {c}")
        for split, ls in lines.items():
            rng.shuffle(ls)
            (root / f"{domain}_{split}.txt").write_text("\n".join(ls) + "\n")
    return root


WRITERS = {"cifar100": write_cifar, "imagenet-r": write_imagenet_r, "domainnet": write_domainnet}
# What each sample holds, and the settings that read it (for the command's message).
CLASSES = {"cifar100": 100, "imagenet-r": len(WNIDS), "domainnet": len(DN_CLASSES)}
