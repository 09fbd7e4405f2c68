"""DomainNet (Peng et al. 2019) from its released folders and published file lists.

Layout: ``<root>/<domain>/<class>/<file>.jpg`` for the six domains, and beside them the published lists
``<root>/<domain>_train.txt`` / ``<domain>_test.txt`` with lines ``<domain>/<class>/<file>.jpg <label>``
(labels 0..344, the classes in alphabetical order). The benchmark is class-incremental over the images of
all six domains pooled (345 classes; the paper: 5 tasks of 69). Samples are ordered by label, then domain
(in :data:`DOMAINS` order), then list order.
"""
from __future__ import annotations

import os

import numpy as np

from ..storage import file_digest
from .base import DataError, FileSource

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
NUM_CLASSES = 345


def _read_list(path: str, domain: str) -> list[tuple[str, int]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{path}:{n}: expected '<domain>/<class>/<file> <label>', got {line!r}")
            rel, label = parts[0], int(parts[1])
            segs = rel.split("/")
            if len(segs) != 3 or segs[0] != domain:
                raise DataError(f"{path}:{n}: path {rel!r} is not '{domain}/<class>/<file>'")
            if label < 0:
                raise DataError(f"{path}:{n}: negative label {label}")
            rows.append((rel, label))
    return rows


def load_domainnet_sources(root: str):
    """Train/test sources over all six domains, the class names, and a provenance manifest."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DataError(f"data.root={root!r}: not a directory; expected the DomainNet folder with the six "
                        f"domain folders {list(DOMAINS)} and their <domain>_train.txt / <domain>_test.txt lists")
    missing_dirs = [d for d in DOMAINS if not os.path.isdir(os.path.join(root, d))]
    missing_lists = [f"{d}_{s}.txt" for d in DOMAINS for s in ("train", "test")
                     if not os.path.isfile(os.path.join(root, f"{d}_{s}.txt"))]
    if missing_dirs or missing_lists:
        what = []
        if missing_dirs:
            what.append(f"domain folders {missing_dirs}")
        if missing_lists:
            what.append(f"file lists {missing_lists}")
        raise DataError(f"data.root={root!r}: wrong folder layout for DomainNet: missing {' and '.join(what)}; "
                        f"expected <root>/<domain>/<class>/<file>.jpg for the domains {list(DOMAINS)} and the "
                        "published lists <root>/<domain>_train.txt and <domain>_test.txt beside them")
    lists, list_sha = {}, {}
    class_of: dict[int, str] = {}
    for split in ("train", "test"):
        rows = []
        for d, domain in enumerate(DOMAINS):
            path = os.path.join(root, f"{domain}_{split}.txt")
            list_sha[f"{domain}_{split}.txt"] = file_digest(path)
            for rel, label in _read_list(path, domain):
                cls = rel.split("/")[1]
                if class_of.setdefault(label, cls) != cls:
                    raise DataError(f"{path}: label {label} is class {cls!r} here but {class_of[label]!r} "
                                    "elsewhere; the lists disagree")
                rows.append((label, d, len(rows), rel))
        rows.sort()
        lists[split] = rows
    num_classes = max(class_of) + 1 if class_of else 0
    if sorted(class_of) != list(range(num_classes)):
        gaps = sorted(set(range(num_classes)) - set(class_of))[:5]
        raise DataError(f"DomainNet lists in {root!r}: labels must be 0..{num_classes - 1} with every class "
                        f"present; missing e.g. {gaps}")
    names = [class_of[c] for c in range(num_classes)]
    train, test = (FileSource(root, [r[3] for r in lists[s]], np.asarray([r[0] for r in lists[s]], dtype=np.int64))
                   for s in ("train", "test"))
    per_domain = {s: {dom: sum(1 for r in lists[s] if r[1] == d) for d, dom in enumerate(DOMAINS)}
                  for s in ("train", "test")}
    manifest = {
        "source": "domainnet", "root": os.path.abspath(root), "split": "the published <domain>_train/test lists",
        "domains": list(DOMAINS), "num_classes": num_classes, "complete": num_classes == NUM_CLASSES,
        "num_train": len(train), "num_test": len(test), "per_domain": per_domain, "lists_sha256": list_sha,
        "order": "by label, then domain, then list order",
    }
    return train, test, names, manifest
